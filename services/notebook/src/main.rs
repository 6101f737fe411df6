//! The `cube-notebook` binary: Cube's notebook service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_notebook::server)
}
