//! The `cube-projects` binary: Cube's projects service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_projects::server)
}
