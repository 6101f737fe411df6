//! Cube's serving service: inference services: deploy, autoscale, canary and rollback.
//!
//! Its API (package `cube.serving.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the serving server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("serving", "cube.serving.v1")
}
