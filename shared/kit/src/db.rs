//! Connecting to a service's database (SQLite, PostgreSQL or MySQL/MariaDB) and bringing its tables up to date.

use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use sea_orm_migration::MigratorTrait;

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names a database Cube does not support.
    #[error("unsupported database URL {0:?}: expected sqlite://PATH, postgres://USER@HOST/DB or mysql://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// The directory for an SQLite file could not be created.
    #[error("creating the directory for {path}: {source}")]
    Directory {
        /// The SQLite file's path.
        path: String,
        /// What the file system said.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("connecting to the {backend} database at {target}: {source}")]
    Connect {
        /// Which kind of database.
        backend: &'static str,
        /// The URL, with any password replaced by `***`.
        target: String,
        /// What the driver said.
        source: DbErr,
    },
    /// A migration failed.
    #[error("migrating the database: {0}")]
    Migrate(DbErr),
}

/// Opens the database at `url` and, when `migrate` is set, applies the migrations of `M` that it lacks.
///
/// An `sqlite://` file (and its directory) is created when missing; `sqlite::memory:` opens a private in-memory
/// database.
///
/// # Errors
/// Returns an error naming the backend when the URL is unsupported, the database is unreachable, or a migration
/// fails.
pub async fn connect<M: MigratorTrait>(url: &str, migrate: bool) -> Result<DatabaseConnection, DbError> {
    let (backend, url) = normalize(url)?;
    let target = redact(&url);
    let db = Database::connect(options(backend, url))
        .await
        .map_err(|source| DbError::Connect {
            backend,
            target,
            source,
        })?;
    if migrate {
        M::up(&db, None).await.map_err(DbError::Migrate)?;
    }
    tracing::info!(backend, "database ready");
    Ok(db)
}

fn options(backend: &'static str, url: String) -> ConnectOptions {
    let in_memory = url == MEMORY;
    let mut options = ConnectOptions::new(url);
    options
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    if backend == "sqlite" {
        // SQLite serialises writers; one connection avoids "database is locked" under concurrent writes.
        options.max_connections(1);
    }
    if in_memory {
        // An in-memory database lives only as long as its connection: the pool must never close it for being
        // idle or old, or the tables vanish and every later query fails with "no such table".
        options.min_connections(1).idle_timeout(None).max_lifetime(None);
    }
    options
}

const MEMORY: &str = "sqlite::memory:";

fn normalize(url: &str) -> Result<(&'static str, String), DbError> {
    if url == MEMORY {
        return Ok(("sqlite", url.to_owned()));
    }
    if let Some(rest) = url.strip_prefix("sqlite://") {
        let path = rest.split('?').next().unwrap_or(rest);
        if path.is_empty() {
            return Err(DbError::UnsupportedUrl(redact(url)));
        }
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| DbError::Directory {
                path: path.to_owned(),
                source,
            })?;
        }
        let url = if rest.contains("mode=") {
            url.to_owned()
        } else if rest.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        return Ok(("sqlite", url));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(("postgres", url.to_owned()));
    }
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return Ok(("mysql", url.replacen("mariadb://", "mysql://", 1)));
    }
    Err(DbError::UnsupportedUrl(redact(url)))
}

/// Returns `url` with the password of its user info replaced by `***`, so error messages and logs can show it.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    // The user info ends at the last `@` before the query: a password may itself hold `/` or `@`.
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    format!("{}{}:***{}", &url[..start], &rest[..colon], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recognised_and_others_refused_with_the_accepted_forms() {
        assert_eq!(normalize("postgres://u@h/d").expect("pg").0, "postgres");
        assert_eq!(normalize("mariadb://u@h/d").expect("maria").1, "mysql://u@h/d");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/nested/cube.db", dir.path().display());
        let (backend, normalized) = normalize(&url).expect("sqlite");
        assert_eq!(backend, "sqlite");
        assert!(normalized.ends_with("?mode=rwc"));
        assert!(dir.path().join("nested").is_dir());
        let err = normalize("mongodb://h/d").expect_err("mongo");
        assert!(err.to_string().contains("expected sqlite://PATH"), "{err}");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact("mongodb://cube:hunter2@h:27017/d"),
            "mongodb://cube:***@h:27017/d"
        );
        assert_eq!(redact("redis://:p@ss/w0rd@h:6379/0?x=1"), "redis://:***@h:6379/0?x=1");
        for unchanged in [
            "postgres://cube@h/d",
            "sqlite:///var/lib/cube@1/cube.db",
            "sqlite::memory:",
            "h:1",
        ] {
            assert_eq!(redact(unchanged), unchanged);
        }
        let err = normalize("mongodb://cube:hunter2@h/d").expect_err("mongo");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn an_in_memory_database_keeps_its_one_connection_open() {
        let (backend, url) = normalize(MEMORY).expect("memory");
        let memory = options(backend, url);
        assert_eq!(memory.get_max_connections(), Some(1));
        assert_eq!(memory.get_min_connections(), Some(1));
        assert_eq!(memory.get_idle_timeout(), Some(None));
        assert_eq!(memory.get_max_lifetime(), Some(None));
        let file = options("sqlite", "sqlite://cube.db?mode=rwc".to_owned());
        assert_eq!(file.get_idle_timeout(), None, "files keep the pool's defaults");
    }

    #[tokio::test]
    async fn an_in_memory_database_keeps_its_tables_between_calls() {
        use sea_orm::ConnectionTrait;
        struct NoMigrations;
        impl MigratorTrait for NoMigrations {
            fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
                Vec::new()
            }
        }
        let db = connect::<NoMigrations>(MEMORY, true).await.expect("memory");
        db.execute_unprepared("CREATE TABLE t (x INTEGER)")
            .await
            .expect("create");
        db.execute_unprepared("INSERT INTO t VALUES (1)").await.expect("insert");
        assert!(
            db.query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT x FROM t"
            ))
            .await
            .expect("select")
            .is_some()
        );
    }
}
