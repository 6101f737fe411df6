//! The `cube-scheduler` binary: Cube's scheduler service on its own.

use std::process::ExitCode;

use clap::Parser;

/// Cube's scheduler: clusters, placement and admission.
#[derive(Debug, Parser)]
#[command(name = "cube-scheduler", version)]
struct Command {
    #[command(flatten)]
    serve: cube_kit::cli::ServeArgs,
    #[command(flatten)]
    scheduler: cube_scheduler::SchedulerArgs,
}

fn main() -> ExitCode {
    let command = Command::parse();
    cube_kit::cli::block_on(
        command.serve.server.worker_threads,
        cube_scheduler::serve(command.serve, command.scheduler),
    )
}
