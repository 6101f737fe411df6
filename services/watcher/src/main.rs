//! The `cube-watcher` binary: Cube's watcher service on its own.

fn main() -> std::process::ExitCode {
    cube_kit::cli::main(cube_watcher::server)
}
