//! Cube's scheduler service: clusters, node inventory, placement, quota admission and sharing idle nodes.
//!
//! Its API (package `cube.scheduler.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the scheduler server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("scheduler", "cube.scheduler.v1")
}
