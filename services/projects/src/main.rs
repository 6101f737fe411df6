//! The `cube-projects` binary: Cube's projects service on its own.

use std::process::ExitCode;

use clap::Parser;

/// Cube's projects service: project groups, members, settings and quotas.
#[derive(Debug, Parser)]
#[command(name = "cube-projects", version)]
struct Command {
    #[command(flatten)]
    serve: cube_kit::cli::ServeArgs,
    #[command(flatten)]
    projects: cube_projects::ProjectsArgs,
}

fn main() -> ExitCode {
    let command = Command::parse();
    cube_kit::cli::block_on(
        command.serve.server.worker_threads,
        cube_projects::serve(command.serve, command.projects),
    )
}
