//! Finds the real dependencies that `scripts/test-env.sh` started, so tests talk to them.
//!
//! A setting comes from the process environment first (`CUBE_TEST_POSTGRES_URL=… cargo nextest run`), then from
//! the file `.cube-test/env` at the workspace root, which the script writes. A test that needs a dependency nobody
//! started fails with a message that says how to start it: it never passes silently.

use std::path::PathBuf;
use std::time::Duration;

/// Returns the workspace root, where `.cube-test/` lives.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Returns the path of the file `scripts/test-env.sh` writes its settings to.
pub fn env_file() -> PathBuf {
    workspace_root().join(".cube-test/env")
}

/// Returns a test-environment setting, or `None` when neither the environment nor the env file has it.
pub fn lookup(var: &str) -> Option<String> {
    if let Ok(value) = std::env::var(var) {
        return Some(value);
    }
    let text = std::fs::read_to_string(env_file()).ok()?;
    text.lines().find_map(|line| {
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=')?;
        (key.trim() == var).then(|| value.trim().trim_matches('\'').trim_matches('"').to_owned())
    })
}

/// Returns a test-environment setting, and panics with instructions when it is missing.
pub fn require(var: &str) -> String {
    lookup(var).unwrap_or_else(|| {
        panic!(
            "{var} is not set and {} does not name it: start the test environment with `scripts/test-env.sh up` \
             (or run every test with `scripts/test.sh`)",
            env_file().display()
        )
    })
}

/// Polls `check` every 20 ms until it returns `Some`, and panics naming `what` when `timeout` passes first.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
