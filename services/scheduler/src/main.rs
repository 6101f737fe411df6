//! The `cube-scheduler` binary: Cube's scheduler service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_scheduler::server)
}
