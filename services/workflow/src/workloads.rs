//! `cube.common.v1.ProjectWorkloadService` as the workflow service answers it: a project's live runs, which keep
//! the projects service from deleting the project under them.

use cube_kit::ApiError;
use cube_proto::cube::common::v1::project_workload_service_server::ProjectWorkloadService;
use cube_proto::cube::common::v1::{ListProjectWorkloadsRequest, ListProjectWorkloadsResponse};
use tonic::{Request, Response, Status};

use crate::access::{Access, Need};
use crate::pipelines::project_name;
use crate::status;
use crate::store::Store;

/// Serves `ProjectWorkloadService`.
#[derive(Clone)]
pub(crate) struct Workloads {
    pub(crate) store: Store,
    pub(crate) access: Access,
}

impl Workloads {
    async fn list(
        &self,
        request: Request<ListProjectWorkloadsRequest>,
    ) -> Result<ListProjectWorkloadsResponse, ApiError> {
        let project = project_name("project", &request.get_ref().project)?;
        self.access
            .check(
                &request,
                project,
                Need::Read,
                ("project", &request.get_ref().project),
                "runs.list",
            )
            .await?;
        Ok(ListProjectWorkloadsResponse {
            workloads: self.store.live_runs_of(project).await?,
        })
    }
}

#[tonic::async_trait]
impl ProjectWorkloadService for Workloads {
    async fn list_project_workloads(
        &self,
        request: Request<ListProjectWorkloadsRequest>,
    ) -> Result<Response<ListProjectWorkloadsResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }
}
