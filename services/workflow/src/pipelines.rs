//! `cube.workflow.v1.PipelineService`: a project's DAGs of tasks, validated whole before anything is stored.

use std::collections::BTreeSet;

use cube_kit::identity::Principal;
use cube_kit::mask::UpdateMask;
use cube_kit::names::{PROJECT_ID_RULE, is_project_id};
use cube_kit::page::{decode_token, finish_page, page_size, parse_filter};
use cube_kit::time::{now_ms, timestamp};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::workflow::v1::pipeline_service_server::PipelineService;
use cube_proto::cube::workflow::v1::{
    CopyPipelineRequest, CreatePipelineRequest, DeletePipelineRequest, GetPipelineRequest,
    GetTaskRecommendationRequest, ListPipelinesRequest, ListPipelinesResponse, Pipeline, Task, TaskRecommendation,
    UpdatePipelineRequest,
};
use cube_resources::{CpuSpec, GpuSpec, MemorySpec};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::access::{Access, Need};
use crate::dag::{self, is_label};
use crate::launch::template_id;
use crate::model::pipeline;
use crate::store::Store;
use crate::templates::{check_etag, etag, visible};
use crate::{args, status};

/// The longest pipeline id (cube-studio's).
const MAX_ID: usize = 54;
/// The most tasks a pipeline holds.
const MAX_TASKS: usize = 2000;
/// The most retries a task may ask for.
const MAX_RETRIES: i32 = 100;

/// Serves `PipelineService`.
#[derive(Clone)]
pub(crate) struct Pipelines {
    pub(crate) store: Store,
    pub(crate) access: Access,
}

/// The project and pipeline ids of `projects/{project}/pipelines/{pipeline}` in `field`.
pub(crate) fn pipeline_name<'a>(field: &str, name: &'a str) -> Result<(&'a str, &'a str), ApiError> {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["projects", project, "pipelines", pipeline] if is_project_id(project) && is_label(pipeline, MAX_ID) => {
            Ok((project, pipeline))
        }
        _ => Err(ApiError::invalid(
            field,
            format!("{name:?} is not a pipeline name, projects/{{project}}/pipelines/{{pipeline}}"),
        )),
    }
}

/// The project id of `projects/{project}` in `field`.
pub(crate) fn project_name<'a>(field: &str, name: &'a str) -> Result<&'a str, ApiError> {
    match name.strip_prefix("projects/") {
        Some(project) if is_project_id(project) => Ok(project),
        _ => Err(ApiError::invalid(
            field,
            format!("{name:?} is not a project name, projects/{{project}}, the project being {PROJECT_ID_RULE}"),
        )),
    }
}

/// What a list's `parent` names: one pipeline, `projects/{project}/pipelines/{pipeline}`, or every pipeline of a
/// project, `projects/{project}/pipelines/-`.
pub(crate) struct ListParent<'a> {
    /// The project id.
    pub(crate) project: &'a str,
    /// The pipeline id, when one is named.
    pub(crate) pipeline: Option<&'a str>,
    /// What a non-member is told does not exist: its kind and name.
    pub(crate) hidden: (&'static str, &'a str),
}

/// The [`ListParent`] of `parent`.
pub(crate) fn list_parent(parent: &str) -> Result<ListParent<'_>, ApiError> {
    match parent.strip_suffix("/pipelines/-") {
        Some(project_part) => Ok(ListParent {
            project: project_name("parent", project_part)?,
            pipeline: None,
            hidden: ("project", project_part),
        }),
        None => {
            let (project, pipeline) = pipeline_name("parent", parent)?;
            Ok(ListParent {
                project,
                pipeline: Some(pipeline),
                hidden: ("pipeline", parent),
            })
        }
    }
}

/// The pipeline a row holds.
pub(crate) fn message(row: &pipeline::Model) -> Pipeline {
    let mut pipeline = Pipeline::decode(row.spec.as_slice()).unwrap_or_default();
    pipeline.name = format!("projects/{}/pipelines/{}", row.project, row.id);
    pipeline.creator = format!("users/{}", row.creator);
    pipeline.create_time = Some(timestamp(row.created_ms));
    pipeline.update_time = Some(timestamp(row.updated_ms));
    pipeline.etag = etag(row.revision);
    pipeline
}

/// What is stored of a pipeline: its message without output fields.
fn spec_of(pipeline: &Pipeline) -> Vec<u8> {
    Pipeline {
        name: String::new(),
        creator: String::new(),
        create_time: None,
        update_time: None,
        etag: String::new(),
        ..pipeline.clone()
    }
    .encode_to_vec()
}

/// The ids of the templates `tasks` use, as the row keeps them (` a b `).
fn templates_of(tasks: &[Task]) -> String {
    let ids: BTreeSet<&str> = tasks.iter().map(|task| template_id(&task.template)).collect();
    format!(" {} ", ids.into_iter().collect::<Vec<_>>().join(" "))
}

/// The problems of one task's own fields (not its template's arguments).
fn task_violations(at: &str, task: &Task) -> Vec<FieldViolation> {
    let mut found = Vec::new();
    let field = |name: &str| format!("{at}.{name}");
    if !task.cpu.is_empty()
        && let Err(error) = task.cpu.parse::<CpuSpec>()
    {
        found.push(FieldViolation::new(field("cpu"), error.to_string()));
    }
    if !task.memory.is_empty()
        && let Err(error) = task.memory.parse::<MemorySpec>()
    {
        found.push(FieldViolation::new(field("memory"), error.to_string()));
    }
    if let Err(error) = task.gpu.parse::<GpuSpec>() {
        found.push(FieldViolation::new(field("gpu"), error.to_string()));
    }
    if let Some(retry) = &task.retry {
        if !(0..=MAX_RETRIES).contains(&retry.limit) {
            found.push(FieldViolation::new(
                field("retry.limit"),
                format!("must be 0 to {MAX_RETRIES}"),
            ));
        }
        if retry.backoff_factor != 0.0 && !(1.0..=100.0).contains(&retry.backoff_factor) {
            found.push(FieldViolation::new(
                field("retry.backoff_factor"),
                "must be 1 to 100 (0: the default 2)",
            ));
        }
        for (name, duration) in [
            ("retry.backoff", &retry.backoff),
            ("retry.max_backoff", &retry.max_backoff),
        ] {
            if duration.as_ref().is_some_and(|d| d.seconds < 0 || d.nanos < 0) {
                found.push(FieldViolation::new(field(name), "must not be negative"));
            }
        }
    }
    if task.timeout.as_ref().is_some_and(|d| d.seconds < 0 || d.nanos < 0) {
        found.push(FieldViolation::new(field("timeout"), "must not be negative"));
    }
    if let Err(error) = cube_volumes::parse(&task.volume_mounts) {
        found.push(FieldViolation::new(field("volume_mounts"), error.to_string()));
    }
    for pair in task
        .node_selector
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
    {
        if pair.split_once('=').is_none_or(|(key, _)| key.trim().is_empty()) {
            found.push(FieldViolation::new(
                field("node_selector"),
                format!("{pair:?} is not key=value"),
            ));
        }
    }
    found
}

impl Pipelines {
    /// Checks `pipeline` whole (under `pipeline.`): names, edges and cycles, each task's fields, template and
    /// arguments. Templates must be visible to `caller`.
    pub(crate) async fn validate(&self, caller: &Principal, pipeline: &Pipeline) -> Result<(), ApiError> {
        let mut found = Vec::new();
        if pipeline.display_name.chars().count() > 100 {
            found.push(FieldViolation::new(
                "pipeline.display_name",
                "is longer than 100 characters",
            ));
        }
        if pipeline.parallelism < 0 {
            found.push(FieldViolation::new(
                "pipeline.parallelism",
                "must not be negative (0: no limit)",
            ));
        }
        for (index, line) in pipeline.global_env.lines().enumerate() {
            let line = line.trim();
            if !line.is_empty() && line.split_once('=').is_none_or(|(key, _)| key.trim().is_empty()) {
                found.push(FieldViolation::new(
                    "pipeline.global_env",
                    format!("line {} ({line:?}) is not KEY=value", index + 1),
                ));
            }
        }
        if pipeline.tasks.len() > MAX_TASKS {
            found.push(FieldViolation::new(
                "pipeline.tasks",
                format!("holds more than {MAX_TASKS} tasks"),
            ));
        }
        found.extend(dag::violations("pipeline.tasks", &pipeline.tasks));
        let ids: Vec<String> = pipeline
            .tasks
            .iter()
            .map(|task| template_id(&task.template).to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let templates = self.store.templates(&ids).await?;
        for (index, task) in pipeline.tasks.iter().enumerate() {
            let at = format!("pipeline.tasks[{index}]");
            found.extend(task_violations(&at, task));
            let template = templates
                .get(template_id(&task.template))
                .filter(|row| task.template.starts_with("jobTemplates/") && visible(caller, row));
            let Some(template) = template else {
                found.push(FieldViolation::new(
                    format!("{at}.template"),
                    format!(
                        "no job template {:?}; name one as jobTemplates/{{template}}",
                        task.template
                    ),
                ));
                continue;
            };
            let template = crate::templates::message(template);
            let given = task.args.as_ref().map(args::struct_to_json).unwrap_or_default();
            found.extend(args::violations(&format!("{at}.args"), &template.args, &given));
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(found))
        }
    }

    async fn create(&self, request: Request<CreatePipelineRequest>) -> Result<Pipeline, ApiError> {
        let body = request.get_ref();
        let project = project_name("parent", &body.parent)?;
        let name = format!("{}/pipelines/{}", body.parent, body.pipeline_id);
        let caller = self
            .access
            .check(
                &request,
                project,
                Need::Write,
                ("project", &body.parent),
                "pipelines.create",
            )
            .await?;
        if !is_label(&body.pipeline_id, MAX_ID) {
            return Err(ApiError::invalid(
                "pipeline_id",
                format!(
                    "{:?} is not a pipeline id: lowercase letters, digits and '-', starting with a letter and ending \
                     with a letter or digit, at most {MAX_ID} characters",
                    body.pipeline_id
                ),
            ));
        }
        let pipeline = body.pipeline.clone().unwrap_or_default();
        self.validate(&caller, &pipeline).await?;
        let now = now_ms();
        let row = pipeline::Model {
            project: project.to_owned(),
            id: body.pipeline_id.clone(),
            creator: caller.username.clone(),
            spec: spec_of(&pipeline),
            templates: templates_of(&pipeline.tasks),
            revision: 1,
            created_ms: now,
            updated_ms: now,
        };
        self.store
            .insert_pipeline(row.clone())
            .await
            .map_err(|error| match error {
                ApiError::AlreadyExists { .. } => ApiError::AlreadyExists { kind: "pipeline", name },
                other => other,
            })?;
        Ok(message(&row))
    }

    /// The pipeline `name` (in `field`), if the caller may do what `need` says with it.
    pub(crate) async fn find<T>(
        &self,
        request: &Request<T>,
        field: &str,
        name: &str,
        need: Need,
        permission: &str,
    ) -> Result<(Principal, pipeline::Model), ApiError> {
        let (project, id) = pipeline_name(field, name)?;
        let caller = self
            .access
            .check(request, project, need, ("pipeline", name), permission)
            .await?;
        let row = self
            .store
            .pipeline(project, id)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                kind: "pipeline",
                name: name.to_owned(),
            })?;
        Ok((caller, row))
    }

    async fn get(&self, request: Request<GetPipelineRequest>) -> Result<Pipeline, ApiError> {
        let name = request.get_ref().name.clone();
        let (_, row) = self.find(&request, "name", &name, Need::Read, "pipelines.get").await?;
        Ok(message(&row))
    }

    async fn list(&self, request: Request<ListPipelinesRequest>) -> Result<ListPipelinesResponse, ApiError> {
        let body = request.get_ref();
        let project = project_name("parent", &body.parent)?;
        let size = page_size(body.page_size)?;
        let after: Option<String> = decode_token(&body.page_token)?;
        let mut creator = None;
        for condition in parse_filter(&body.filter, &["creator"])? {
            creator = Some(
                condition
                    .value
                    .strip_prefix("users/")
                    .unwrap_or(&condition.value)
                    .to_owned(),
            );
        }
        self.access
            .check(
                &request,
                project,
                Need::Read,
                ("project", &body.parent),
                "pipelines.list",
            )
            .await?;
        let mut rows = self
            .store
            .list_pipelines(project, creator.as_deref(), after, size + 1)
            .await?;
        let next_page_token = finish_page(&mut rows, size, |row| row.id.clone());
        Ok(ListPipelinesResponse {
            pipelines: rows.iter().map(message).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdatePipelineRequest>) -> Result<Pipeline, ApiError> {
        let body = request.get_ref();
        let given = body.pipeline.clone().unwrap_or_default();
        let (caller, row) = self
            .find(&request, "pipeline.name", &given.name, Need::Write, "pipelines.update")
            .await?;
        check_etag(&given.name, &given.etag, row.revision)?;
        let mut pipeline = Pipeline::decode(row.spec.as_slice()).map_err(ApiError::internal)?;
        // The fields the mask may name, each copied from the request when it does.
        macro_rules! take {
            ($($field:ident),*) => {
                let mask = UpdateMask::parse(body.update_mask.as_ref(), &[$(stringify!($field)),*])?;
                $(if mask.wants(stringify!($field)) { pipeline.$field = given.$field.clone(); })*
            };
        }
        take!(display_name, description, tasks, parallelism, global_env, auto_tune);
        self.validate(&caller, &pipeline).await?;
        let updated = pipeline::Model {
            spec: spec_of(&pipeline),
            templates: templates_of(&pipeline.tasks),
            revision: row.revision + 1,
            updated_ms: now_ms(),
            ..row.clone()
        };
        self.store.update_pipeline(updated.clone(), row.revision).await?;
        Ok(message(&updated))
    }

    async fn recommend(&self, request: Request<GetTaskRecommendationRequest>) -> Result<TaskRecommendation, ApiError> {
        let body = request.get_ref();
        let (_, row) = self
            .find(&request, "pipeline", &body.pipeline, Need::Read, "pipelines.get")
            .await?;
        let bounds = crate::usage::bounds(&self.access, &request, &row.project).await?;
        crate::usage::recommendation(&self.store, &row, &body.task, bounds, 0).await
    }

    async fn delete(&self, request: Request<DeletePipelineRequest>) -> Result<(), ApiError> {
        let body = request.get_ref();
        let (_, row) = self
            .find(&request, "name", &body.name, Need::Write, "pipelines.delete")
            .await?;
        check_etag(&body.name, &body.etag, row.revision)?;
        self.store.delete_pipeline(&row.project, &row.id, row.revision).await
    }

    async fn copy(&self, request: Request<CopyPipelineRequest>) -> Result<Pipeline, ApiError> {
        let body = request.get_ref();
        let (caller, row) = self
            .find(&request, "name", &body.name, Need::Write, "pipelines.create")
            .await?;
        if !is_label(&body.pipeline_id, MAX_ID) {
            return Err(ApiError::invalid(
                "pipeline_id",
                format!("{:?} is not a pipeline id", body.pipeline_id),
            ));
        }
        let now = now_ms();
        let copy = pipeline::Model {
            id: body.pipeline_id.clone(),
            creator: caller.username.clone(),
            revision: 1,
            created_ms: now,
            updated_ms: now,
            ..row
        };
        let name = format!("projects/{}/pipelines/{}", copy.project, copy.id);
        self.store
            .insert_pipeline(copy.clone())
            .await
            .map_err(|error| match error {
                ApiError::AlreadyExists { .. } => ApiError::AlreadyExists { kind: "pipeline", name },
                other => other,
            })?;
        Ok(message(&copy))
    }
}

#[tonic::async_trait]
impl PipelineService for Pipelines {
    async fn get_task_recommendation(
        &self,
        request: Request<GetTaskRecommendationRequest>,
    ) -> Result<Response<TaskRecommendation>, Status> {
        self.recommend(request).await.map(Response::new).map_err(status)
    }

    async fn create_pipeline(&self, request: Request<CreatePipelineRequest>) -> Result<Response<Pipeline>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_pipeline(&self, request: Request<GetPipelineRequest>) -> Result<Response<Pipeline>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_pipelines(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn update_pipeline(&self, request: Request<UpdatePipelineRequest>) -> Result<Response<Pipeline>, Status> {
        self.update(request).await.map(Response::new).map_err(status)
    }

    async fn delete_pipeline(&self, request: Request<DeletePipelineRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }

    async fn copy_pipeline(&self, request: Request<CopyPipelineRequest>) -> Result<Response<Pipeline>, Status> {
        self.copy(request).await.map(Response::new).map_err(status)
    }
}
