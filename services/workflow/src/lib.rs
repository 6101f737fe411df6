//! Cube's workflow service: job templates, DAG pipelines, runs, tasks and cron schedules.
//!
//! Its API (package `cube.workflow.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the workflow server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("workflow", "cube.workflow.v1")
}
