//! Who may do what in a project: admins everything; members by their role, as the projects service answers with
//! the caller's own token; everyone else sees nothing (NOT_FOUND, as for a missing resource). Also reads the
//! project and places tasks with the caller's token, the two other calls a handler makes on the caller's behalf.

use cube_kit::identity::{Principal, forward_token};
use cube_kit::{ApiError, Channel};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{GetMembershipRequest, GetProjectRequest, Project, Role};
use cube_proto::cube::scheduler::v1::placement_service_client::PlacementServiceClient;
use cube_proto::cube::scheduler::v1::{PlaceRequest, Placement};
use tonic::{Code, Request, Status};

/// What a call needs of the caller in a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// To see: viewers and up.
    Read,
    /// To change or run: developers and up.
    Write,
}

/// The services a handler asks for the caller.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    projects: Channel,
    scheduler: Channel,
}

impl Access {
    /// Asks `projects` and `scheduler`.
    pub(crate) fn new(projects: Channel, scheduler: Channel) -> Self {
        Self { projects, scheduler }
    }

    /// Checks that the caller of `request` may do what `need` says in `project`; `hidden` names the resource the
    /// call is about, which a non-member is told does not exist.
    ///
    /// # Errors
    /// NOT_FOUND (kind `kind`, name `hidden`) for non-members, PERMISSION_DENIED (`permission`) for members whose
    /// role is too low, and the projects service's refusal or unavailability.
    pub(crate) async fn check<T>(
        &self,
        request: &Request<T>,
        project: &str,
        need: Need,
        (kind, hidden): (&'static str, &str),
        permission: &str,
    ) -> Result<Principal, ApiError> {
        let caller = Principal::of(request)?;
        if caller.is_admin() {
            return Ok((*caller).clone());
        }
        let mut ask = Request::new(GetMembershipRequest {
            project: format!("projects/{project}"),
            user: String::new(),
        });
        forward_token(request, &mut ask)?;
        let role = match ProjectServiceClient::new(self.projects.clone())
            .get_membership(ask)
            .await
        {
            Ok(membership) => membership.into_inner().role(),
            Err(status) if status.code() == Code::NotFound => Role::Unspecified,
            Err(status) => return Err(upstream("projects", status)),
        };
        let allowed = match (role, need) {
            (Role::Unspecified, _) => {
                return Err(ApiError::NotFound {
                    kind,
                    name: hidden.to_owned(),
                });
            }
            (_, Need::Read) => true,
            (Role::Developer | Role::Owner, Need::Write) => true,
            (Role::Viewer, Need::Write) => false,
        };
        if !allowed {
            return Err(ApiError::PermissionDenied {
                permission: permission.to_owned(),
            });
        }
        Ok((*caller).clone())
    }

    /// The project `project`, read with the caller's token.
    pub(crate) async fn project<T>(&self, request: &Request<T>, project: &str) -> Result<Project, ApiError> {
        let mut ask = Request::new(GetProjectRequest {
            name: format!("projects/{project}"),
        });
        forward_token(request, &mut ask)?;
        ProjectServiceClient::new(self.projects.clone())
            .get_project(ask)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| upstream("projects", status))
    }

    /// Where the scheduler places a workload of `place`, asked with the caller's token.
    pub(crate) async fn place<T>(&self, request: &Request<T>, place: PlaceRequest) -> Result<Placement, Status> {
        let mut ask = Request::new(place);
        forward_token(request, &mut ask).map_err(|error| error.status(crate::DOMAIN))?;
        PlacementServiceClient::new(self.scheduler.clone())
            .place(ask)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// What a peer's error answer means to the workflow's caller: their credentials' refusal stays theirs; a request
/// the peer finds malformed is our mistake (every name is checked here first), so INTERNAL, never a "retry
/// later"; anything else is the peer being unavailable.
pub(crate) fn upstream(service: &str, status: Status) -> ApiError {
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated => ApiError::Unauthenticated { message },
        Code::PermissionDenied => ApiError::PermissionDenied {
            permission: format!("{service}: {message}"),
        },
        Code::NotFound => ApiError::NotFound {
            kind: "project",
            name: message,
        },
        Code::InvalidArgument => ApiError::internal(format!("{service} refused a request as malformed: {message}")),
        _ => ApiError::Unavailable {
            service: service.to_owned(),
            source: Box::new(status),
        },
    }
}
