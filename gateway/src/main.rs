//! The `cube-gateway` binary: the gateway on its own, in front of separately deployed services.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    cube_gateway::cli::main(cube_gateway::cli::GatewayCommand::parse())
}
