//! The `cube-watcher` binary: Cube's watcher service on its own.

use std::process::ExitCode;

use clap::Parser;

/// Cube's watcher service: every cluster's workloads watched, their changes published as transitions.
#[derive(Debug, Parser)]
#[command(name = "cube-watcher", version)]
struct Command {
    #[command(flatten)]
    serve: cube_kit::cli::ServeArgs,
    #[command(flatten)]
    watcher: cube_watcher::WatcherArgs,
}

fn main() -> ExitCode {
    let command = Command::parse();
    cube_kit::cli::block_on(
        command.serve.server.worker_threads,
        cube_watcher::serve(command.serve, command.watcher),
    )
}
