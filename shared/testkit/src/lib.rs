//! Finds the real dependencies that `scripts/test-env.sh` started, so tests talk to them.
//!
//! A setting comes from the process environment first (`CUBE_TEST_POSTGRES_URL=… cargo nextest run`), then from
//! the file `.cube-test/env` at the workspace root, which the script writes. A test that needs a dependency nobody
//! started fails with a message that says how to start it: it never passes silently.
//!
//! [`kubernetes`] has what tests on the environment's kube-apiserver need: fake nodes, namespaces that clean up,
//! and a fake kubelet that plays the pods bound to the fake nodes. [`prometheus`] runs a real Prometheus server
//! scraping an exporter the test serves.

pub mod kubernetes;
pub mod prometheus;

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

/// A database server the suites run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file in a temporary directory.
    Sqlite,
    /// The PostgreSQL at `CUBE_TEST_POSTGRES_URL`.
    Postgres,
    /// The MariaDB at `CUBE_TEST_MYSQL_URL`.
    MariaDb,
}

/// Runs `body` with the URL of an empty database on `backend` (a fresh `cube_test_<uuid>` database on the
/// servers, a fresh file for SQLite) and drops that database afterwards, also when `body` panics.
pub async fn on_fresh_database<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let database = FreshDatabase::create(backend).await;
    body(database.url.clone()).await;
}

/// An empty database of its own on one backend, dropped with the guard (also while a panic unwinds): a fresh
/// `cube_test_<uuid>` database on the servers, a fresh file in a temporary directory for SQLite.
pub struct FreshDatabase {
    /// The database's URL.
    pub url: String,
    place: Place,
}

/// Where a [`FreshDatabase`] lives, to remove it.
enum Place {
    /// A file in this directory, removed with it.
    File { _dir: tempfile::TempDir },
    /// A database `name` on the server at `base`.
    Server {
        backend: Backend,
        base: String,
        name: String,
    },
}

impl FreshDatabase {
    /// Creates the database, and panics saying why when the backend cannot be reached.
    pub async fn create(backend: Backend) -> Self {
        use sea_orm::ConnectionTrait as _;

        let base = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("tempdir: {error}"));
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                return Self {
                    url,
                    place: Place::File { _dir: dir },
                };
            }
            Backend::Postgres => require("CUBE_TEST_POSTGRES_URL"),
            Backend::MariaDb => require("CUBE_TEST_MYSQL_URL"),
        };
        let name = format!("cube_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sea_orm::Database::connect(&base)
            .await
            .unwrap_or_else(|error| panic!("connecting to {backend:?} at {base}: {error}"));
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("creating the test database: {error}"));
        let _ = admin.close().await;
        Self {
            url: with_database(&base, &name),
            place: Place::Server { backend, base, name },
        }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let Place::Server { backend, base, name } = &self.place else {
            return;
        };
        let (backend, base, name) = (*backend, base.clone(), name.clone());
        kubernetes::clean_up(async move {
            use sea_orm::ConnectionTrait as _;

            let drop = match backend {
                Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                _ => format!("DROP DATABASE IF EXISTS {name}"),
            };
            match sea_orm::Database::connect(&base).await {
                Ok(admin) => {
                    if let Err(error) = admin.execute_unprepared(&drop).await {
                        eprintln!("dropping the test database {name}: {error}");
                    }
                    let _ = admin.close().await;
                }
                Err(error) => eprintln!("dropping the test database {name}: {error}"),
            }
        });
    }
}

/// Returns `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(base, query)| (base, Some(query)));
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |slash| authority_start + slash);
    let mut url = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Runs each named `async fn name(url: &str)` of the calling module as three tests, `sqlite::name`,
/// `postgres::name` and `mariadb::name`, each on a fresh database of that backend.
#[macro_export]
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::on_fresh_database($crate::Backend::Sqlite, |url| async move { super::$test(&url).await }).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::on_fresh_database($crate::Backend::Postgres, |url| async move { super::$test(&url).await }).await;
            })*
        }
        mod mariadb {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::on_fresh_database($crate::Backend::MariaDb, |url| async move { super::$test(&url).await }).await;
            })*
        }
    };
}
