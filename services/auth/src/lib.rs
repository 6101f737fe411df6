//! Cube's auth service: users, password and LDAP login, tokens and RBAC.
//!
//! Its API (package `cube.auth.v1`) arrives with the issue that builds it; until then the server answers health
//! and reflection only.

/// Builds the auth server.
pub fn server() -> cube_kit::Server {
    cube_kit::Server::new("auth", "cube.auth.v1")
}
