//! Cube's watcher service: watching Kubernetes and turning changes into state transitions and notifications.
//!
//! Its API (package `cube.watcher.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the watcher server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("watcher", "cube.watcher.v1")
}
