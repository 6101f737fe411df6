//! Connecting to a service's database (SQLite, PostgreSQL or MySQL/MariaDB) and bringing its tables up to date.

use std::path::Path;
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
    /// The SQLite file could not be created.
    #[error("creating the SQLite file {path}: {source}")]
    File {
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
/// database. SQLite files hold secrets (auth's signing keys), so on Unix a new file is created readable by its
/// owner only (0600), and SQLite gives its `-journal`, `-wal` and `-shm` files the same mode; an existing file or
/// companion that others may read is tightened to 0600, with a warning. Directories created for the file are
/// 0700.
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
    if backend == "sqlite" && !in_memory {
        // Write-ahead logging: a commit appends to the `-wal` file and syncs it once (synchronous stays FULL, so a
        // committed transaction survives a crash or a power cut), where the default rollback journal syncs the
        // journal and the database several times; readers in other processes do not block the writer.
        options.map_sqlx_sqlite_opts(|sqlite| sqlite.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal));
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
        if let Some(dir) = Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            create_dir(dir).map_err(|source| DbError::Directory {
                path: path.to_owned(),
                source,
            })?;
        }
        // Opened read-only (mode=ro) or without creating (mode=rw), a missing file must stay missing.
        let creates = !rest.contains("mode=") || rest.contains("mode=rwc");
        secure_sqlite_file(Path::new(path), creates)?;
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

/// Creates `dir` and its missing parents, the new ones readable by the owner only (0700 on Unix).
fn create_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates the directory `path` readable by its owner only (0700 on Unix), with its missing parents; an
/// existing one that others may read, write or enter is tightened to 0700, with a warning. What `cube up` does
/// to its data directory.
///
/// # Errors
/// Returns the file system's error when the directory cannot be created, or is not a directory.
pub fn private_directory(path: &Path) -> std::io::Result<()> {
    create_dir(path)?;
    let metadata = std::fs::metadata(path)?;
    if !metadata.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", path.display()),
        ));
    }
    tighten(path, &metadata, 0o700);
    Ok(())
}

/// Creates the SQLite file at `path` owner-only when it is missing and `creates` is set, and tightens it and its
/// companions (`-journal`, `-wal`, `-shm`) when others may read them.
fn secure_sqlite_file(path: &Path, creates: bool) -> Result<(), DbError> {
    if creates {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        // SQLite creates the journal, WAL and shared-memory files with the mode of the database file, so creating
        // that file 0600 before SQLite does covers them all.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(DbError::File {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let file = Path::new(&file);
        if let Ok(metadata) = std::fs::metadata(file)
            && metadata.is_file()
        {
            tighten(file, &metadata, 0o600);
        }
    }
    Ok(())
}

/// Sets `path` to `mode` when its group or others hold any permission, logging what it was; a failure is logged,
/// not returned, since some file systems (SMB, some CSI volumes) do not keep modes at all.
#[cfg(unix)]
fn tighten(path: &Path, metadata: &std::fs::Metadata, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let was = metadata.permissions().mode() & 0o777;
    if was & 0o077 == 0 {
        return;
    }
    let path_text = path.display().to_string();
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => tracing::warn!(
            path = %path_text,
            was = %format!("{was:o}"),
            now = %format!("{mode:o}"),
            "tightened the permissions of a path others could use"
        ),
        Err(error) => tracing::warn!(
            path = %path_text,
            was = %format!("{was:o}"),
            %error,
            "others can use this path and its permissions could not be tightened"
        ),
    }
}

#[cfg(not(unix))]
fn tighten(_path: &Path, _metadata: &std::fs::Metadata, _mode: u32) {}

/// Returns `url` with the password of its user info replaced by `***`, so error messages and logs can show it.
pub fn redact(url: &str) -> String {
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
