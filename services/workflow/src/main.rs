//! The `cube-workflow` binary: Cube's workflow service on its own.

use std::process::ExitCode;

use clap::Parser;

/// Cube's workflow service: job templates, pipelines and their runs.
#[derive(Debug, Parser)]
#[command(name = "cube-workflow", version)]
struct Command {
    #[command(flatten)]
    serve: cube_kit::cli::ServeArgs,
    #[command(flatten)]
    workflow: cube_workflow::WorkflowArgs,
}

fn main() -> ExitCode {
    let command = Command::parse();
    cube_kit::cli::block_on(
        command.serve.server.worker_threads,
        cube_workflow::serve(command.serve, command.workflow),
    )
}
