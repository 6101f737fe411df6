//! Cube's projects service: project groups, membership roles, per-project settings and quotas.
//!
//! Its API (package `cube.projects.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the projects server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("projects", "cube.projects.v1")
}
