//! The two shapes Cube ships, which every cross-service test runs on: embedded (SQLite files and the in-process
//! bus, as `cube up` runs) and deployed (PostgreSQL or MariaDB, and Redis Streams).

use std::path::Path;
use std::sync::Arc;

use cube_bus::{BusOptions, EventBus, MemoryBus, RedisBus};
use cube_testkit::{Backend, FreshDatabase};

/// Where a platform under test keeps its state and sends its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// SQLite files and the in-process bus.
    Embedded,
    /// PostgreSQL and Redis Streams.
    PostgresRedis,
    /// MariaDB and Redis Streams.
    MariaDbRedis,
}

/// The databases and the bus of one platform under test, removed with it: a fresh database per service on the
/// shape's backend, and a bus of its own (a Redis namespace no other test uses, deleted afterwards).
pub struct Backing {
    /// The shape.
    pub shape: Shape,
    bus: Arc<dyn EventBus>,
    redis: Option<(deadpool_redis::Pool, String)>,
    databases: Vec<FreshDatabase>,
    dir: tempfile::TempDir,
}

impl Backing {
    /// Makes the bus of `shape`; databases come with [`Backing::database`].
    pub fn new(shape: Shape) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("tempdir: {error}"));
        let (bus, redis): (Arc<dyn EventBus>, _) = match shape {
            Shape::Embedded => (Arc::new(MemoryBus::new(BusOptions::default())), None),
            Shape::PostgresRedis | Shape::MariaDbRedis => {
                let url = cube_testkit::require("CUBE_TEST_REDIS_URL");
                let pool = cube_kit::redis::pool(&url).unwrap_or_else(|error| panic!("redis pool: {error}"));
                let namespace = format!("cube-test-{}", uuid::Uuid::new_v4().simple());
                let options = BusOptions {
                    namespace: namespace.clone(),
                    ..BusOptions::default()
                };
                (Arc::new(RedisBus::new(pool.clone(), options)), Some((pool, namespace)))
            }
        };
        Self {
            shape,
            bus,
            redis,
            databases: Vec::new(),
            dir,
        }
    }

    /// The database URL of `service` (`auth`, `projects`, `scheduler`, ...): a file in the platform's directory,
    /// or a fresh database on the server.
    pub async fn database(&mut self, service: &str) -> String {
        let backend = match self.shape {
            Shape::Embedded => {
                return format!("sqlite://{}", self.dir.path().join(format!("{service}.db")).display());
            }
            Shape::PostgresRedis => Backend::Postgres,
            Shape::MariaDbRedis => Backend::MariaDb,
        };
        let database = FreshDatabase::create(backend).await;
        let url = database.url.clone();
        self.databases.push(database);
        url
    }

    /// The platform's bus.
    pub fn bus(&self) -> Arc<dyn EventBus> {
        self.bus.clone()
    }

    /// The flags that put a service process on this platform's bus: its Redis URL and namespace, or none for the
    /// in-process bus (which no other process shares).
    pub fn bus_flags(&self) -> Vec<String> {
        match &self.redis {
            Some((_, namespace)) => vec![
                "--redis-url".to_owned(),
                cube_testkit::require("CUBE_TEST_REDIS_URL"),
                "--redis-namespace".to_owned(),
                namespace.clone(),
            ],
            None => Vec::new(),
        }
    }

    /// A directory of the platform's own, removed with it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        let Some((pool, namespace)) = self.redis.take() else {
            return;
        };
        cube_testkit::kubernetes::clean_up(async move {
            let Ok(mut connection) = pool.get().await else {
                return;
            };
            let keys: Vec<String> = deadpool_redis::redis::cmd("KEYS")
                .arg(format!("{namespace}:*"))
                .query_async(&mut connection)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = deadpool_redis::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await;
            }
        });
    }
}

/// Runs each named `async fn name(shape: Shape)` of the calling module as tests named by shape:
/// `embedded::name` (SQLite, in-process bus) and `postgres_redis::name` (PostgreSQL, Redis Streams). With
/// `mariadb` first, every test also runs as `mariadb_redis::name`; after `; mariadb:`, only the tests listed
/// there do (they run on the other two shapes too).
#[macro_export]
macro_rules! on_every_shape {
    (@shape $module:ident, $shape:ident, $($test:ident,)*) => {
        mod $module {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test($crate::shape::Shape::$shape).await;
            })*
        }
    };
    (mariadb, $($test:ident),* $(,)?) => {
        $crate::on_every_shape!(; mariadb: $($test),*);
    };
    ($($test:ident),* $(,)? ; mariadb: $($also:ident),* $(,)?) => {
        $crate::on_every_shape!(@shape embedded, Embedded, $($test,)* $($also,)*);
        $crate::on_every_shape!(@shape postgres_redis, PostgresRedis, $($test,)* $($also,)*);
        $crate::on_every_shape!(@shape mariadb_redis, MariaDbRedis, $($also,)*);
    };
    ($($test:ident),* $(,)?) => {
        $crate::on_every_shape!(@shape embedded, Embedded, $($test,)*);
        $crate::on_every_shape!(@shape postgres_redis, PostgresRedis, $($test,)*);
    };
}
