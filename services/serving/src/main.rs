//! The `cube-serving` binary: Cube's serving service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_serving::server)
}
