//! What a run starts: the [`Snapshot`] a run keeps of its pipeline, templates and placements, and the workload of
//! one attempt of a task, with cube-studio's command line, labels and `KFJ_*` environment (reference §4.3–4.5),
//! so that existing cube-studio job images run unchanged.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use cube_proto::cube::scheduler::v1::Placement;
use cube_proto::cube::workflow::v1::{JobTemplate, Pipeline, Task};
use cube_runtime::{Container, ObjectKey, PodField, RestartPolicy, WorkloadSpec, labels};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::args;

/// The template env keys that set the pod's own resources (a launcher's) instead of the task's.
const TASK_RESOURCE_CPU: &str = "TASK_RESOURCE_CPU";
const TASK_RESOURCE_MEMORY: &str = "TASK_RESOURCE_MEMORY";
const TASK_RESOURCE_GPU: &str = "TASK_RESOURCE_GPU";

/// A task's CPU when the pipeline gives none (cube-studio's default is 2; one core is what a laptop spares).
pub(crate) const DEFAULT_CPU: &str = "1";
/// A task's memory when the pipeline gives none.
pub(crate) const DEFAULT_MEMORY: &str = "2G";

/// The environment variable holding the time a run is for: a scheduled run's fire time, another run's creation
/// (cube-studio's `execution_date`).
pub(crate) const EXECUTION_DATE: &str = "execution_date";
/// The pod annotation holding the same.
pub(crate) const EXECUTION_DATE_ANNOTATION: &str = "cube.dev/execution-date";

/// What a run runs, as it was when it was created: the pipeline, the templates its tasks use, where each task
/// is placed, and the project's mounts.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// The pipeline.
    pub(crate) pipeline: Pipeline,
    /// The templates, by id; registry passwords are not kept.
    pub(crate) templates: BTreeMap<String, JobTemplate>,
    /// Each task's placement, by task name.
    pub(crate) placements: BTreeMap<String, Placement>,
    /// The project's volume mounts, in cube-studio's syntax.
    pub(crate) project_volumes: String,
    /// The platform's environment for every task (`KFJ_MODEL_REPO_API_URL`, ...).
    pub(crate) global_env: Vec<(String, String)>,
    /// For a `DebugTask` run: how long its pod sleeps instead of running the task.
    pub(crate) debug_seconds: Option<u64>,
}

/// [`Snapshot`] as stored: protobuf messages in base64 inside JSON.
#[derive(Serialize, Deserialize)]
struct Stored {
    pipeline: String,
    templates: BTreeMap<String, String>,
    placements: BTreeMap<String, String>,
    project_volumes: String,
    global_env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    debug_seconds: Option<u64>,
}

impl Snapshot {
    /// The stored form.
    pub(crate) fn encode(&self) -> String {
        let stored = Stored {
            pipeline: STANDARD.encode(self.pipeline.encode_to_vec()),
            templates: self
                .templates
                .iter()
                .map(|(id, template)| (id.clone(), STANDARD.encode(template.encode_to_vec())))
                .collect(),
            placements: self
                .placements
                .iter()
                .map(|(task, placement)| (task.clone(), STANDARD.encode(placement.encode_to_vec())))
                .collect(),
            project_volumes: self.project_volumes.clone(),
            global_env: self.global_env.clone(),
            debug_seconds: self.debug_seconds,
        };
        serde_json::to_string(&stored).unwrap_or_default()
    }

    /// Reads the stored form back.
    ///
    /// # Errors
    /// Says what is broken.
    pub(crate) fn decode(text: &str) -> Result<Self, String> {
        fn message<M: prost::Message + Default>(text: &str) -> Result<M, String> {
            let bytes = STANDARD.decode(text).map_err(|error| error.to_string())?;
            M::decode(bytes.as_slice()).map_err(|error| error.to_string())
        }
        let stored: Stored = serde_json::from_str(text).map_err(|error| error.to_string())?;
        Ok(Self {
            pipeline: message(&stored.pipeline)?,
            templates: stored
                .templates
                .iter()
                .map(|(id, text)| Ok((id.clone(), message(text)?)))
                .collect::<Result<_, String>>()?,
            placements: stored
                .placements
                .iter()
                .map(|(task, text)| Ok((task.clone(), message(text)?)))
                .collect::<Result<_, String>>()?,
            project_volumes: stored.project_volumes,
            global_env: stored.global_env,
            debug_seconds: stored.debug_seconds,
        })
    }

    /// The task named `name`.
    pub(crate) fn task(&self, name: &str) -> Option<&Task> {
        self.pipeline.tasks.iter().find(|task| task.name == name)
    }

    /// The template `task` runs.
    pub(crate) fn template(&self, task: &Task) -> Option<&JobTemplate> {
        self.templates.get(template_id(&task.template))
    }
}

/// The id of a template's resource name (`jobTemplates/{id}`).
pub(crate) fn template_id(name: &str) -> &str {
    name.strip_prefix("jobTemplates/").unwrap_or(name)
}

/// The registry an image reference pulls from: its first part when that names a host (has a `.` or `:`, or is
/// `localhost`), Docker Hub's otherwise.
pub(crate) fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => "https://index.docker.io/v1/",
    }
}

/// The resources a task's pod asks the scheduler for: the template's `TASK_RESOURCE_*` when it sets them (a
/// launcher's own), the task's otherwise.
pub(crate) fn pod_resources(task: &Task, template: &JobTemplate) -> (String, String, String) {
    let own = |key: &str, given: &str, default: &str| {
        template.env.get(key).cloned().unwrap_or_else(|| {
            if given.is_empty() {
                default.to_owned()
            } else {
                given.to_owned()
            }
        })
    };
    (
        own(TASK_RESOURCE_CPU, &task.cpu, DEFAULT_CPU),
        own(TASK_RESOURCE_MEMORY, &task.memory, DEFAULT_MEMORY),
        own(TASK_RESOURCE_GPU, &task.gpu, ""),
    )
}

/// The run an attempt belongs to, as its workload needs it.
#[derive(Debug, Clone)]
pub(crate) struct RunContext<'a> {
    /// The project id.
    pub(crate) project: &'a str,
    /// The pipeline id.
    pub(crate) pipeline: &'a str,
    /// The run id.
    pub(crate) run: &'a str,
    /// The user it runs for.
    pub(crate) creator: &'a str,
    /// What it runs.
    pub(crate) snapshot: &'a Snapshot,
}

/// The name of attempt `number` of task `task` of run `run`: `{task}-{run}-{number}`, a DNS label.
pub(crate) fn workload_name(task: &str, run: &str, number: i32) -> String {
    format!("{task}-{run}-{number}")
}

/// The workload of attempt `number` of `task`, or why it cannot be made (its template is missing from the
/// snapshot, which validation prevents).
pub(crate) fn workload(context: &RunContext<'_>, task: &Task, number: i32) -> Result<WorkloadSpec, String> {
    let snapshot = context.snapshot;
    let template = snapshot
        .template(task)
        .ok_or_else(|| format!("template {} of task {} is missing", task.template, task.name))?;
    let placement = snapshot.placements.get(&task.name).cloned().unwrap_or_default();
    let rendered = args::render(
        &template.args,
        &task.args.as_ref().map(args::struct_to_json).unwrap_or_default(),
    );
    let image = rendered.image.clone().unwrap_or_else(|| template.image.clone());
    let working_dir = [
        &rendered.working_dir,
        &Some(task.working_dir.clone()),
        &Some(template.working_dir.clone()),
    ]
    .into_iter()
    .flatten()
    .find(|dir| !dir.is_empty())
    .cloned();
    let (command, argv) = if let Some(seconds) = snapshot.debug_seconds {
        // A debug pod only waits for a shell; `sh`, since not every image has bash.
        (
            vec!["sh".to_owned(), "-c".to_owned(), format!("sleep {seconds}")],
            Vec::new(),
        )
    } else if task.command.trim().is_empty() {
        let entrypoint: Vec<String> = template.entrypoint.split_whitespace().map(str::to_owned).collect();
        (entrypoint, rendered.argv)
    } else {
        let lines: Vec<&str> = task
            .command
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        (vec!["bash".to_owned(), "-c".to_owned(), lines.join(" && ")], Vec::new())
    };
    let volumes = cube_volumes::parse(&task_volumes(snapshot, template, task)).map_err(|error| error.to_string())?;
    let name = workload_name(&task.name, context.run, number);
    let mut labels = labels::for_project(context.project);
    for (key, value) in [
        (labels::PIPELINE, context.pipeline),
        (labels::RUN, context.run),
        (labels::TASK, task.name.as_str()),
        (labels::USER, context.creator),
        // cube-studio's own labels, which its launchers and dashboards select by.
        ("pipeline-id", context.pipeline),
        ("pipeline-name", context.pipeline),
        ("task-id", task.name.as_str()),
        ("task-name", task.name.as_str()),
        ("run-id", context.run),
        ("run-rtx", context.creator),
        ("pipeline-rtx", creator_of(&snapshot.pipeline)),
    ] {
        labels.insert(key.to_owned(), value.to_owned());
    }
    let env = environment(context, task, template, &placement, &image);
    // The fire time a pod runs for, findable without reading its environment.
    let annotations = env
        .iter()
        .filter(|(key, _)| key == EXECUTION_DATE)
        .map(|(_, value)| (EXECUTION_DATE_ANNOTATION.to_owned(), value.clone()))
        .collect();
    Ok(WorkloadSpec {
        key: ObjectKey::new(placement.cluster.clone(), placement.namespace.clone(), name),
        labels,
        annotations,
        containers: vec![Container {
            name: "main".to_owned(),
            image,
            command,
            args: argv,
            env,
            // The downward API values cube-studio's job images read.
            env_from_pod: vec![
                ("K8S_NODE_NAME".to_owned(), PodField::NodeName),
                ("K8S_POD_IP".to_owned(), PodField::PodIp),
                ("K8S_HOST_IP".to_owned(), PodField::HostIp),
                ("K8S_POD_NAME".to_owned(), PodField::PodName),
            ],
            working_dir,
            ..Container::default()
        }],
        volumes,
        user: context.creator.to_owned(),
        placement: Some(placement),
        restart_policy: RestartPolicy::Never,
        // The engine stops attempts at their timeout itself; the deadline is Kubernetes' own backstop.
        deadline: task
            .timeout
            .as_ref()
            .and_then(|timeout| u64::try_from(timeout.seconds).ok())
            .filter(|seconds| *seconds > 0)
            .map(std::time::Duration::from_secs),
        image_pull_secrets: Vec::new(),
        service_account: (!template.service_account.is_empty()).then(|| template.service_account.clone()),
        privileged: template.privileged,
        owner: None,
    })
}

/// The username of a pipeline's creator (`users/{user}`).
fn creator_of(pipeline: &Pipeline) -> &str {
    pipeline.creator.strip_prefix("users/").unwrap_or(&pipeline.creator)
}

/// A task's environment, in cube-studio's order: the template's, then the platform's and the pipeline's global
/// env (later keys replace earlier ones), then the per-task `KFJ_*` values.
fn environment(
    context: &RunContext<'_>,
    task: &Task,
    template: &JobTemplate,
    placement: &Placement,
    image: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| name == key) {
            value.clone_into(&mut slot.1);
        } else {
            env.push((key.to_owned(), value.to_owned()));
        }
    };
    for (key, value) in &template.env {
        set(key, value);
    }
    for (key, value) in &context.snapshot.global_env {
        set(key, value);
    }
    for line in context.snapshot.pipeline.global_env.lines() {
        if let Some((key, value)) = line.split_once('=')
            && !key.trim().is_empty()
        {
            set(key.trim(), value.trim());
        }
    }
    let selector: Vec<String> = placement
        .node_selector
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let gpu_resource = placement
        .requests
        .keys()
        .find(|key| key.contains("gpu"))
        .cloned()
        .unwrap_or_default();
    let run_values = [
        ("KFJ_PIPELINE_ID", context.pipeline),
        ("KFJ_PIPELINE_NAME", context.pipeline),
        ("KFJ_RUN_ID", context.run),
        ("KFJ_CREATOR", creator_of(&context.snapshot.pipeline)),
        ("KFJ_RUNNER", context.creator),
        ("KFJ_NAMESPACE", placement.namespace.as_str()),
        ("KFJ_ENVIRONMENT", placement.cluster.as_str()),
        ("KFJ_TASK_ID", task.name.as_str()),
        ("KFJ_TASK_NAME", task.name.as_str()),
        ("KFJ_TASK_NODE_SELECTOR", &selector.join(",")),
        ("KFJ_TASK_VOLUME_MOUNT", &task_volumes(context.snapshot, template, task)),
        ("KFJ_TASK_IMAGES", image),
        ("KFJ_TASK_RESOURCE_CPU", or_default(&task.cpu, DEFAULT_CPU)),
        ("KFJ_TASK_RESOURCE_MEMORY", or_default(&task.memory, DEFAULT_MEMORY)),
        ("KFJ_TASK_RESOURCE_GPU", &task.gpu.replace('+', "")),
        ("KFJ_TASK_PROJECT_NAME", context.project),
        ("GPU_RESOURCE_NAME", &gpu_resource),
        ("USERNAME", context.creator),
        ("HUBSECRET", ""),
    ];
    for (key, value) in run_values {
        set(key, value);
    }
    env
}

pub(crate) fn or_default<'a>(given: &'a str, default: &'a str) -> &'a str {
    if given.is_empty() { default } else { given }
}

/// The mounts a task's pod gets, in cube-studio's syntax.
fn task_volumes(snapshot: &Snapshot, template: &JobTemplate, task: &Task) -> String {
    [
        snapshot.project_volumes.as_str(),
        template.volume_mounts.as_str(),
        task.volume_mounts.as_str(),
    ]
    .into_iter()
    .filter(|text| !text.trim().is_empty())
    .collect::<Vec<_>>()
    .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cube_proto::cube::workflow::v1::{ArgSpec, ArgType};

    fn snapshot() -> Snapshot {
        let template = JobTemplate {
            name: "jobTemplates/train".into(),
            image: "python:3.12".into(),
            entrypoint: "python train.py".into(),
            env: [
                ("TASK_RESOURCE_CPU".to_owned(), "0.5".to_owned()),
                ("A".to_owned(), "template".to_owned()),
            ]
            .into(),
            args: vec![
                ArgSpec {
                    name: "--epochs".into(),
                    r#type: ArgType::Int as i32,
                    default_json: "2".into(),
                    editable: true,
                    ..ArgSpec::default()
                },
                ArgSpec {
                    name: "--fast".into(),
                    r#type: ArgType::Bool as i32,
                    editable: true,
                    ..ArgSpec::default()
                },
            ],
            ..JobTemplate::default()
        };
        let task = Task {
            name: "train".into(),
            template: "jobTemplates/train".into(),
            cpu: "4".into(),
            memory: "8G".into(),
            args: Some(prost_types::Struct {
                fields: [(
                    "--fast".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::BoolValue(true)),
                    },
                )]
                .into(),
            }),
            ..Task::default()
        };
        Snapshot {
            pipeline: Pipeline {
                name: "projects/vision/pipelines/daily".into(),
                tasks: vec![task],
                global_env: "A=pipeline\nB=2".into(),
                creator: "users/lena".into(),
                ..Pipeline::default()
            },
            templates: [("train".to_owned(), template)].into(),
            placements: [(
                "train".to_owned(),
                Placement {
                    cluster: "kube".into(),
                    namespace: "pipeline".into(),
                    node_selector: [("train".to_owned(), "true".to_owned())].into(),
                    ..Placement::default()
                },
            )]
            .into(),
            project_volumes: String::new(),
            global_env: vec![("KFJ_ARCHIVE_BASE_PATH".into(), "/archives".into())],
            debug_seconds: None,
        }
    }

    #[test]
    fn a_debug_pod_sleeps_with_the_tasks_image_env_and_placement() {
        let mut snapshot = snapshot();
        snapshot.debug_seconds = Some(600);
        let context = RunContext {
            project: "vision",
            pipeline: "daily",
            run: "r1a2b3c4d5",
            creator: "omar",
            snapshot: &snapshot,
        };
        let spec = workload(&context, &snapshot.pipeline.tasks[0], 1).expect("a workload");
        let main = &spec.containers[0];
        assert_eq!(main.command, ["sh", "-c", "sleep 600"]);
        assert!(main.args.is_empty());
        assert!(
            main.env
                .iter()
                .any(|(key, value)| key == "KFJ_RUN_ID" && value == "r1a2b3c4d5")
        );
        assert_eq!(
            spec.placement.as_ref().map(|placement| placement.namespace.as_str()),
            Some("pipeline")
        );
    }

    #[test]
    fn images_name_their_registry() {
        assert_eq!(registry_of("harbor.example/ml/train:1"), "harbor.example");
        assert_eq!(registry_of("localhost:5000/train"), "localhost:5000");
        assert_eq!(registry_of("python:3.12"), "https://index.docker.io/v1/");
        assert_eq!(registry_of("library/python"), "https://index.docker.io/v1/");
    }

    #[test]
    fn a_snapshot_survives_storage() {
        let mut snapshot = snapshot();
        assert_eq!(Snapshot::decode(&snapshot.encode()), Ok(snapshot.clone()));
        snapshot.debug_seconds = Some(60);
        assert_eq!(Snapshot::decode(&snapshot.encode()), Ok(snapshot));
    }

    #[test]
    fn an_attempt_runs_the_entrypoint_with_cube_studios_argv_labels_and_env() {
        let snapshot = snapshot();
        let context = RunContext {
            project: "vision",
            pipeline: "daily",
            run: "r1a2b3c4d5",
            creator: "omar",
            snapshot: &snapshot,
        };
        let spec = workload(&context, &snapshot.pipeline.tasks[0], 2).expect("a workload");
        assert_eq!(spec.key, ObjectKey::new("kube", "pipeline", "train-r1a2b3c4d5-2"));
        let main = &spec.containers[0];
        assert_eq!(main.command, ["python", "train.py"]);
        assert_eq!(main.args, ["--epochs", "2", "--fast"]);
        let env: BTreeMap<&str, &str> = main.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env["A"], "pipeline");
        assert_eq!(env["B"], "2");
        assert_eq!(env["KFJ_RUN_ID"], "r1a2b3c4d5");
        assert_eq!(env["KFJ_CREATOR"], "lena");
        assert_eq!(env["KFJ_RUNNER"], "omar");
        assert_eq!(env["KFJ_TASK_RESOURCE_CPU"], "4");
        assert_eq!(env["KFJ_TASK_NODE_SELECTOR"], "train=true");
        assert_eq!(env["KFJ_ARCHIVE_BASE_PATH"], "/archives");
        assert_eq!(spec.labels["run-id"], "r1a2b3c4d5");
        assert_eq!(spec.labels[labels::TASK], "train");
        assert_eq!(
            pod_resources(&snapshot.pipeline.tasks[0], &snapshot.templates["train"]),
            ("0.5".to_owned(), "8G".to_owned(), String::new())
        );
    }
}
