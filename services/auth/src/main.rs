//! The auth service on its own.

use std::process::ExitCode;

use clap::Parser;

/// Cube's auth service: users, password and LDAP login, tokens and RBAC.
#[derive(Debug, Parser)]
#[command(name = "cube-auth", version)]
struct Command {
    #[command(flatten)]
    serve: cube_kit::cli::ServeArgs,
    #[command(flatten)]
    auth: cube_auth::AuthArgs,
}

fn main() -> ExitCode {
    let command = Command::parse();
    cube_kit::cli::block_on(
        command.serve.server.worker_threads,
        cube_auth::serve(command.serve, command.auth),
    )
}
