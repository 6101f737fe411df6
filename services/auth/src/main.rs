//! The `cube-auth` binary: Cube's auth service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_auth::server)
}
