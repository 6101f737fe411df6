//! Cube's notebook service: notebook lifecycle: create, stop and start, renew, idle and expiry clean-up.
//!
//! Its API (package `cube.notebook.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the notebook server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("notebook", "cube.notebook.v1")
}
