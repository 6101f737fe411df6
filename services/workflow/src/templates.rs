//! `cube.workflow.v1.JobTemplateService`: job templates. Any signed-in user may create one (it starts `ALPHA`,
//! seen by its creator and admins only) and use the released ones; its creator and admins change and delete it.

use std::sync::Arc;

use cube_kit::identity::Principal;
use cube_kit::mask::UpdateMask;
use cube_kit::names::{PROJECT_ID_RULE, is_project_id};
use cube_kit::page::{decode_token, finish_page, page_size, parse_filter};
use cube_kit::time::{now_ms, timestamp};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::projects::v1::ProjectType;
use cube_proto::cube::workflow::v1::job_template_service_server::JobTemplateService;
use cube_proto::cube::workflow::v1::{
    CreateJobTemplateRequest, DeleteJobTemplateRequest, GetJobTemplateRequest, JobTemplate, ListJobTemplatesRequest,
    ListJobTemplatesResponse, TemplateVersion, UpdateJobTemplateRequest,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::access::Access;
use crate::dag::is_label;
use crate::model::template;
use crate::secrets::SecretKey;
use crate::store::Store;
use crate::{args, status};

/// The longest template id.
const MAX_ID: usize = 50;

/// Serves `JobTemplateService`.
#[derive(Clone)]
pub(crate) struct Templates {
    pub(crate) store: Store,
    pub(crate) key: Option<Arc<SecretKey>>,
    /// Reads template categories (projects) with the caller's token.
    pub(crate) access: Access,
}

/// The etag of revision `revision`.
pub(crate) fn etag(revision: i64) -> String {
    format!("\"v{revision}\"")
}

/// Refuses with ABORTED a change of `name`, now at `revision`, asked with an `etag` (when given) it no longer has.
pub(crate) fn check_etag(name: &str, given: &str, revision: i64) -> Result<(), ApiError> {
    if given.is_empty() || given == etag(revision) {
        return Ok(());
    }
    Err(ApiError::Aborted {
        message: format!("{name} changed since etag {given}: read it again"),
    })
}

/// The id of `jobTemplates/{id}` in `field`.
pub(crate) fn template_id<'a>(field: &str, name: &'a str) -> Result<&'a str, ApiError> {
    match name.strip_prefix("jobTemplates/") {
        Some(id) if is_label(id, MAX_ID) => Ok(id),
        _ => Err(ApiError::invalid(
            field,
            format!("{name:?} is not a job template name, jobTemplates/{{template}}"),
        )),
    }
}

fn version_of(version: i32) -> &'static str {
    match TemplateVersion::try_from(version) {
        Ok(TemplateVersion::Release) => "RELEASE",
        _ => "ALPHA",
    }
}

/// The template a row holds, as its caller sees it.
pub(crate) fn message(row: &template::Model) -> JobTemplate {
    let mut template = JobTemplate::decode(row.spec.as_slice()).unwrap_or_default();
    template.name = format!("jobTemplates/{}", row.id);
    template.registry_password = String::new();
    template.has_registry_password = !row.registry_password.is_empty();
    template.creator = format!("users/{}", row.creator);
    template.create_time = Some(timestamp(row.created_ms));
    template.update_time = Some(timestamp(row.updated_ms));
    template.etag = etag(row.revision);
    template
}

/// Whether `caller` may see template `row`.
pub(crate) fn visible(caller: &Principal, row: &template::Model) -> bool {
    row.version == "RELEASE" || caller.is_admin() || row.creator == caller.username
}

/// The problems of a template's fields (under `job_template.`).
fn violations(caller: &Principal, template: &JobTemplate) -> Vec<FieldViolation> {
    let mut found = Vec::new();
    let field = |name: &str| format!("job_template.{name}");
    if template.image.trim().is_empty() || template.image.chars().any(char::is_whitespace) {
        found.push(FieldViolation::new(
            field("image"),
            "give an image reference without spaces, e.g. python:3.12",
        ));
    }
    if template.display_name.chars().count() > 100 {
        found.push(FieldViolation::new(
            field("display_name"),
            "is longer than 100 characters",
        ));
    }
    if !template.category.is_empty()
        && template
            .category
            .strip_prefix("projects/")
            .is_none_or(|id| !is_project_id(id))
    {
        found.push(FieldViolation::new(
            field("category"),
            format!(
                "{:?} is not a project name, projects/{{project}}, the project being {PROJECT_ID_RULE}",
                template.category
            ),
        ));
    }
    if let Err(error) = cube_volumes::parse(&template.volume_mounts) {
        found.push(FieldViolation::new(field("volume_mounts"), error.to_string()));
    }
    if template.privileged && !caller.is_admin() {
        found.push(FieldViolation::new(
            field("privileged"),
            "only admins may make privileged templates",
        ));
    }
    for key in template.env.keys() {
        if key.is_empty() || !key.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_') {
            found.push(FieldViolation::new(
                field("env"),
                format!("{key:?} is not an environment variable name"),
            ));
        }
    }
    found.extend(args::schema_violations(&field("args"), &template.args));
    found
}

/// What is stored of a template: its message without output fields and password.
fn spec_of(template: &JobTemplate) -> Vec<u8> {
    JobTemplate {
        name: String::new(),
        registry_password: String::new(),
        has_registry_password: false,
        creator: String::new(),
        create_time: None,
        update_time: None,
        etag: String::new(),
        ..template.clone()
    }
    .encode_to_vec()
}

impl Templates {
    fn seal(&self, password: &str) -> Result<Vec<u8>, ApiError> {
        if password.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key.as_ref().ok_or_else(|| ApiError::FailedPrecondition {
            message: "registry passwords need the workflow service's --secret-key-file, which is not set".to_owned(),
        })?;
        key.seal(password.as_bytes())
    }

    /// Why `category` (a well-formed `projects/{project}`, or empty) cannot be a template's category: it is no
    /// template-category project the caller can see.
    async fn category_violation<T>(
        &self,
        request: &Request<T>,
        category: &str,
    ) -> Result<Option<FieldViolation>, ApiError> {
        let Some(id) = category.strip_prefix("projects/").filter(|id| is_project_id(id)) else {
            return Ok(None);
        };
        let violation = |message: String| Ok(Some(FieldViolation::new("job_template.category", message)));
        match self.access.project(request, id).await {
            Ok(project) if project.r#type() == ProjectType::TemplateCategory => Ok(None),
            Ok(project) => violation(format!(
                "{category} is a {} project, not a template category",
                project.r#type().as_str_name().trim_start_matches("PROJECT_TYPE_")
            )),
            Err(ApiError::NotFound { .. }) => violation(format!(
                "there is no template category {category} that you can see (ask an admin to make you a member)"
            )),
            Err(error) => Err(error),
        }
    }

    async fn create(&self, request: Request<CreateJobTemplateRequest>) -> Result<JobTemplate, ApiError> {
        let caller = Principal::of(&request)?;
        let category = request
            .get_ref()
            .job_template
            .as_ref()
            .map(|template| template.category.clone())
            .unwrap_or_default();
        let category_violation = self.category_violation(&request, &category).await?;
        let body = request.into_inner();
        let mut template = body.job_template.unwrap_or_default();
        let mut found = Vec::new();
        if !is_label(&body.job_template_id, MAX_ID) {
            found.push(FieldViolation::new(
                "job_template_id",
                format!(
                    "{:?} is not a template id: lowercase letters, digits and '-', starting with a letter, at most \
                     {MAX_ID} characters",
                    body.job_template_id
                ),
            ));
        }
        found.extend(violations(&caller, &template));
        found.extend(category_violation);
        if !found.is_empty() {
            return Err(ApiError::InvalidArgument(found));
        }
        if template.version == TemplateVersion::Unspecified as i32 {
            template.version = TemplateVersion::Alpha as i32;
        }
        let now = now_ms();
        let row = template::Model {
            id: body.job_template_id,
            creator: caller.username.clone(),
            version: version_of(template.version).to_owned(),
            category: template.category.clone(),
            display_order: template.display_order,
            spec: spec_of(&template),
            registry_password: self.seal(&template.registry_password)?,
            revision: 1,
            created_ms: now,
            updated_ms: now,
        };
        self.store.insert_template(row.clone()).await?;
        Ok(message(&row))
    }

    /// The template `name` if `caller` may see it.
    async fn visible(&self, caller: &Principal, field: &str, name: &str) -> Result<template::Model, ApiError> {
        let id = template_id(field, name)?;
        match self.store.template(id).await? {
            Some(row) if visible(caller, &row) => Ok(row),
            _ => Err(ApiError::NotFound {
                kind: "job template",
                name: name.to_owned(),
            }),
        }
    }

    /// The template `name` if `caller` may change it.
    async fn owned(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
        etag_given: &str,
    ) -> Result<template::Model, ApiError> {
        let row = self.visible(caller, field, name).await?;
        if !caller.is_admin() && row.creator != caller.username {
            return Err(ApiError::PermissionDenied {
                permission: "jobTemplates.update (its creator and admins)".to_owned(),
            });
        }
        check_etag(name, etag_given, row.revision)?;
        Ok(row)
    }

    async fn get(&self, request: Request<GetJobTemplateRequest>) -> Result<JobTemplate, ApiError> {
        let caller = Principal::of(&request)?;
        Ok(message(&self.visible(&caller, "name", &request.get_ref().name).await?))
    }

    async fn list(&self, request: Request<ListJobTemplatesRequest>) -> Result<ListJobTemplatesResponse, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let size = page_size(body.page_size)?;
        let after: Option<(String, i32, String)> = decode_token(&body.page_token)?;
        let mut filters = Vec::new();
        for condition in parse_filter(&body.filter, &["category", "version", "creator"])? {
            let (column, value) = match condition.field.as_str() {
                "category" => (template::Column::Category, condition.value),
                "version" => (template::Column::Version, condition.value.to_uppercase()),
                _ => (
                    template::Column::Creator,
                    condition
                        .value
                        .strip_prefix("users/")
                        .unwrap_or(&condition.value)
                        .to_owned(),
                ),
            };
            filters.push((column, value));
        }
        let viewer = (!caller.is_admin()).then(|| caller.username.clone());
        let mut rows = self
            .store
            .list_templates(viewer.as_deref(), &filters, after, size + 1)
            .await?;
        let next_page_token = finish_page(&mut rows, size, |row| {
            (row.category.clone(), row.display_order, row.id.clone())
        });
        Ok(ListJobTemplatesResponse {
            job_templates: rows.iter().map(message).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateJobTemplateRequest>) -> Result<JobTemplate, ApiError> {
        let caller = Principal::of(&request)?;
        // The caller's credentials, to read a new category with.
        let from = Request::from_parts(request.metadata().clone(), tonic::Extensions::default(), ());
        let body = request.into_inner();
        let given = body.job_template.unwrap_or_default();
        let row = self
            .owned(&caller, "job_template.name", &given.name, &given.etag)
            .await?;
        let mut template = JobTemplate::decode(row.spec.as_slice()).map_err(ApiError::internal)?;
        // The fields the mask may name, each copied from the request when it does; the password is sealed.
        macro_rules! take {
            ($($field:ident),*) => {{
                let mask = UpdateMask::parse(
                    body.update_mask.as_ref(),
                    &[$(stringify!($field)),*, "registry_password"],
                )?;
                $(if mask.wants(stringify!($field)) { template.$field = given.$field.clone(); })*
                mask
            }};
        }
        let mask = take!(
            display_name,
            description,
            image,
            registry_user,
            entrypoint,
            working_dir,
            env,
            volume_mounts,
            privileged,
            service_account,
            version,
            category,
            help_url,
            display_order,
            args
        );
        let password = mask
            .wants("registry_password")
            .then(|| self.seal(&given.registry_password))
            .transpose()?;
        let mut found = violations(&caller, &template);
        // A category is checked when it changes: a template keeps one whose project went away.
        if template.category != row.category {
            found.extend(self.category_violation(&from, &template.category).await?);
        }
        if !found.is_empty() {
            return Err(ApiError::InvalidArgument(found));
        }
        let updated = template::Model {
            version: version_of(template.version).to_owned(),
            category: template.category.clone(),
            display_order: template.display_order,
            spec: spec_of(&template),
            registry_password: password.unwrap_or_else(|| row.registry_password.clone()),
            revision: row.revision + 1,
            updated_ms: now_ms(),
            ..row.clone()
        };
        self.store.update_template(updated.clone(), row.revision).await?;
        Ok(message(&updated))
    }

    async fn delete(&self, request: Request<DeleteJobTemplateRequest>) -> Result<(), ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let row = self.owned(&caller, "name", &body.name, &body.etag).await?;
        self.store.delete_template(&row.id, row.revision).await
    }
}

#[tonic::async_trait]
impl JobTemplateService for Templates {
    async fn create_job_template(
        &self,
        request: Request<CreateJobTemplateRequest>,
    ) -> Result<Response<JobTemplate>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_job_template(&self, request: Request<GetJobTemplateRequest>) -> Result<Response<JobTemplate>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_job_templates(
        &self,
        request: Request<ListJobTemplatesRequest>,
    ) -> Result<Response<ListJobTemplatesResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn update_job_template(
        &self,
        request: Request<UpdateJobTemplateRequest>,
    ) -> Result<Response<JobTemplate>, Status> {
        self.update(request).await.map(Response::new).map_err(status)
    }

    async fn delete_job_template(&self, request: Request<DeleteJobTemplateRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }
}
