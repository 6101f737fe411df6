//! The `cube-workflow` binary: Cube's workflow service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_workflow::server)
}
