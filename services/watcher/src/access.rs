//! Who may see which events: admins all of them; anyone else the events of the projects they are a member of,
//! as the projects service answers with the caller's own token (so a service account acting for a user sees what
//! that user sees).

use cube_kit::identity::{Principal, forward_token};
use cube_kit::{ApiError, Channel};
use cube_proto::cube::projects::v1::ListProjectsRequest;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Status};

use crate::filter::Reader;

/// Reads memberships from the projects service.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    projects: Channel,
}

impl Access {
    /// Asks the projects service behind `projects`.
    pub(crate) fn new(projects: Channel) -> Self {
        Self { projects }
    }

    /// What `caller`, whose call carried `metadata`, may read.
    ///
    /// # Errors
    /// The projects service's refusal of the caller's credentials (UNAUTHENTICATED, PERMISSION_DENIED), or
    /// UNAVAILABLE when it cannot answer.
    pub(crate) async fn reader(&self, metadata: &MetadataMap, caller: &Principal) -> Result<Reader, ApiError> {
        if caller.is_admin() {
            return Ok(Reader::Admin);
        }
        let from = Request::from_parts(metadata.clone(), tonic::Extensions::default(), ());
        let mut client = ProjectServiceClient::new(self.projects.clone());
        let mut projects = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut list = Request::new(ListProjectsRequest {
                page_size: 1000,
                page_token,
                filter: "mine = true".to_owned(),
            });
            forward_token(&from, &mut list)?;
            let page = client.list_projects(list).await.map_err(upstream)?.into_inner();
            projects.extend(page.projects.into_iter().map(|project| project.name));
            if page.next_page_token.is_empty() {
                return Ok(Reader::Member(projects));
            }
            page_token = page.next_page_token;
        }
    }
}

/// What the projects service's refusal means to the watcher's caller: their credentials' refusal stays theirs; a
/// request it finds malformed is our mistake, so INTERNAL, never a "retry later"; anything else is the projects
/// service being unavailable.
fn upstream(status: Status) -> ApiError {
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated => ApiError::Unauthenticated { message },
        Code::PermissionDenied => ApiError::PermissionDenied {
            permission: "projects.list".to_owned(),
        },
        Code::InvalidArgument => ApiError::internal(format!("projects refused a request as malformed: {message}")),
        _ => ApiError::Unavailable {
            service: "projects".to_owned(),
            source: Box::new(status),
        },
    }
}
