//! `cube_kit::db::connect` against real SQLite, PostgreSQL and MariaDB: one test body, run on every backend.
//!
//! PostgreSQL and MariaDB runs each get a database of their own (`cube_kit_<uuid>`), created on the test server's
//! `test` database and dropped afterwards, so runs never see each other's tables.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{pk_auto, string};

use cube_kit::db::{self, DbError};

/// The migrations of a pretend service: a `notes` table, then an index on it.
struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateNotes), Box::new(IndexNotes)]
    }
}

const MIGRATIONS: [&str; 2] = ["m20250101_000001_create_notes", "m20250101_000002_index_notes"];

struct CreateNotes;

impl MigrationName for CreateNotes {
    fn name(&self) -> &str {
        MIGRATIONS[0]
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[async_trait::async_trait]
impl MigrationTrait for CreateNotes {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("notes")
                    .col(pk_auto("id"))
                    .col(string("body"))
                    .to_owned(),
            )
            .await
    }
}

struct IndexNotes;

impl MigrationName for IndexNotes {
    fn name(&self) -> &str {
        MIGRATIONS[1]
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[async_trait::async_trait]
impl MigrationTrait for IndexNotes {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("idx_notes_body")
                    .table("notes")
                    .col("body")
                    .to_owned(),
            )
            .await
    }
}

/// The one test body every backend runs, on an empty database at `url`.
async fn migrations_create_tables_once_and_keep_rows(url: &str, backend: DbBackend) {
    // Without `migrate`, connecting must not touch the schema.
    let db = db::connect::<Migrator>(url, false)
        .await
        .expect("connecting without migrating");
    assert_eq!(db.get_database_backend(), backend);
    let manager = SchemaManager::new(&db);
    for table in ["notes", "seaql_migrations"] {
        let exists = manager.has_table(table).await.expect("asking for a table");
        assert!(!exists, "migrate=false created table {table} on {url}");
    }
    db.close().await.expect("closing");

    let db = db::connect::<Migrator>(url, true)
        .await
        .expect("connecting and migrating");
    let manager = SchemaManager::new(&db);
    assert!(
        manager.has_table("notes").await.expect("asking for notes"),
        "no notes table"
    );
    assert!(
        manager
            .has_index("notes", "idx_notes_body")
            .await
            .expect("asking for the index"),
        "no index idx_notes_body"
    );
    assert_eq!(applied(&db).await, MIGRATIONS);
    insert_note(&db, "first note").await;
    assert_eq!(bodies(&db).await, ["first note"]);
    db.close().await.expect("closing");

    // Migrating an up-to-date database is a no-op that keeps the data.
    let db = db::connect::<Migrator>(url, true)
        .await
        .expect("connecting and migrating again");
    assert_eq!(applied(&db).await, MIGRATIONS);
    assert_eq!(bodies(&db).await, ["first note"]);
    insert_note(&db, "second note").await;
    assert_eq!(bodies(&db).await, ["first note", "second note"]);
    db.close().await.expect("closing");
}

async fn applied(db: &DatabaseConnection) -> Vec<String> {
    Migrator::get_applied_migrations(db)
        .await
        .expect("reading applied migrations")
        .iter()
        .map(|migration| migration.name().to_owned())
        .collect()
}

async fn insert_note(db: &impl ConnectionTrait, body: &str) {
    let insert = Query::insert()
        .into_table("notes")
        .columns(["body"])
        .values_panic([body.into()])
        .to_owned();
    db.execute(&insert).await.expect("inserting a note");
}

async fn bodies(db: &DatabaseConnection) -> Vec<String> {
    let select = Query::select()
        .column("body")
        .from("notes")
        .order_by("id", Order::Asc)
        .to_owned();
    db.query_all(&select)
        .await
        .expect("selecting notes")
        .iter()
        .map(|row| row.try_get::<String>("", "body").expect("reading body"))
        .collect()
}

/// Runs `body` on a fresh database of the server at `base_url`, and drops that database afterwards, also when
/// `body` panics.
async fn on_fresh_database<F, Fut>(base_url: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let name = format!("cube_kit_{}", uuid::Uuid::new_v4().simple());
    let admin = db::connect::<Migrator>(base_url, false)
        .await
        .expect("connecting to the test server's database");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("creating the test database");

    let outcome = AssertUnwindSafe(body(with_database(base_url, &name)))
        .catch_unwind()
        .await;

    let drop = match admin.get_database_backend() {
        DbBackend::Postgres => format!("DROP DATABASE {name} WITH (FORCE)"),
        _ => format!("DROP DATABASE {name}"),
    };
    let dropped = admin.execute_unprepared(&drop).await;
    admin.close().await.expect("closing");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    dropped.expect("dropping the test database");
}

/// Returns `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(base, query)| (base, Some(query)));
    let authority_start = base.find("://").expect("a URL with a scheme") + 3;
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

#[tokio::test]
async fn sqlite_file_in_a_directory_that_does_not_exist_yet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state/nested/cube.db");
    let url = format!("sqlite://{}", path.display());
    migrations_create_tables_once_and_keep_rows(&url, DbBackend::Sqlite).await;
    assert!(path.is_file(), "{} was not created", path.display());
}

#[tokio::test]
async fn sqlite_file_in_an_existing_directory() {
    let file = tempfile::Builder::new().suffix(".db").tempfile().expect("tempfile");
    // An existing empty file is an empty database.
    let url = format!("sqlite://{}", file.path().display());
    migrations_create_tables_once_and_keep_rows(&url, DbBackend::Sqlite).await;
}

#[tokio::test]
async fn postgres() {
    let base = cube_testkit::require("CUBE_TEST_POSTGRES_URL");
    on_fresh_database(&base, |url| async move {
        migrations_create_tables_once_and_keep_rows(&url, DbBackend::Postgres).await;
    })
    .await;
}

#[tokio::test]
async fn mariadb() {
    let base = cube_testkit::require("CUBE_TEST_MYSQL_URL");
    on_fresh_database(&base, |url| async move {
        migrations_create_tables_once_and_keep_rows(&url, DbBackend::MySql).await;
    })
    .await;
}

#[tokio::test]
async fn mariadb_scheme_is_accepted_as_mysql() {
    let base = cube_testkit::require("CUBE_TEST_MYSQL_URL");
    let url = base.replacen("mysql://", "mariadb://", 1);
    let db = db::connect::<Migrator>(&url, false)
        .await
        .expect("connecting with mariadb://");
    assert_eq!(db.get_database_backend(), DbBackend::MySql);
    db.close().await.expect("closing");
}

#[tokio::test]
async fn an_unsupported_url_names_the_accepted_forms() {
    let err = db::connect::<Migrator>("mongodb://127.0.0.1:27017/cube", true)
        .await
        .expect_err("mongodb is not a supported database");
    assert!(matches!(err, DbError::UnsupportedUrl(_)), "{err:?}");
    let message = err.to_string();
    for form in [
        "mongodb://127.0.0.1:27017/cube",
        "sqlite://PATH",
        "postgres://",
        "mysql://",
    ] {
        assert!(message.contains(form), "{message:?} does not mention {form}");
    }
}

#[tokio::test]
async fn an_sqlite_directory_that_cannot_be_created_is_named() {
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    // A regular file cannot hold a directory.
    let path = file.path().join("nested/cube.db");
    let err = db::connect::<Migrator>(&format!("sqlite://{}", path.display()), true)
        .await
        .expect_err("a directory under a file");
    assert!(matches!(err, DbError::Directory { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_fails_in_bounded_time_naming_the_backend() {
    // Port 1 on loopback refuses connections.
    let cases = [
        ("postgres://postgres@127.0.0.1:1/test", "postgres"),
        ("mysql://root@127.0.0.1:1/test", "mysql"),
    ];
    let started = Instant::now();
    let results = futures::future::join_all(
        cases.map(|(url, backend)| async move { (backend, db::connect::<Migrator>(url, true).await) }),
    )
    .await;
    let elapsed = started.elapsed();
    for (backend, result) in results {
        let err = result.expect_err("nothing listens on port 1");
        assert!(
            matches!(&err, DbError::Connect { backend: b, .. } if *b == backend),
            "{err:?}"
        );
        assert!(err.to_string().contains(&format!("the {backend} database")), "{err}");
    }
    assert!(elapsed < Duration::from_secs(30), "giving up took {elapsed:?}");
}

#[test]
fn database_names_are_swapped_in_urls() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("mysql://root@127.0.0.1:3306/test?ssl-mode=disabled", "x"),
        "mysql://root@127.0.0.1:3306/x?ssl-mode=disabled"
    );
    assert_eq!(with_database("mysql://root@h", "x"), "mysql://root@h/x");
}

/// The permission bits of `path`.
#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_files_and_their_new_directories_are_the_owners_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state/nested/auth.db");
    let db = db::connect::<Migrator>(&format!("sqlite://{}", path.display()), true)
        .await
        .expect("connecting and migrating");
    assert_eq!(mode(&path), 0o600, "{}", path.display());
    let companion = |suffix: &str| std::path::PathBuf::from(format!("{}{suffix}", path.display()));
    // SQLite files are opened in WAL mode; the WAL and shared-memory files stay while the connection is open.
    let journal = db
        .query_one_raw(sea_orm::Statement::from_string(
            DbBackend::Sqlite,
            "PRAGMA journal_mode",
        ))
        .await
        .expect("reading the journal mode")
        .expect("a row")
        .try_get_by_index::<String>(0)
        .expect("the mode");
    assert_eq!(journal, "wal");
    insert_note(&db, "a secret").await;
    for suffix in ["-wal", "-shm"] {
        assert_eq!(mode(&companion(suffix)), 0o600, "the {suffix} file");
    }
    for created in [dir.path().join("state"), dir.path().join("state/nested")] {
        assert_eq!(mode(&created), 0o700, "{}", created.display());
    }
    db.close().await.expect("closing");
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_files_others_could_read_are_tightened_on_connect() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth.db");
    let db = db::connect::<Migrator>(&format!("sqlite://{}", path.display()), true)
        .await
        .expect("creating");
    insert_note(&db, "kept").await;
    db.close().await.expect("closing");
    // As an older Cube, or a copy with the default umask, left them.
    let journal = dir.path().join("auth.db-journal");
    std::fs::write(&journal, b"").expect("a stale journal");
    for file in [&path, &journal] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    }
    let db = db::connect::<Migrator>(&format!("sqlite://{}", path.display()), true)
        .await
        .expect("reopening");
    assert_eq!(mode(&path), 0o600);
    // In WAL mode SQLite leaves a stale, empty rollback journal alone.
    assert_eq!(mode(&journal), 0o600);
    assert_eq!(bodies(&db).await, ["kept"], "tightening keeps the data");
    db.close().await.expect("closing");
}

#[cfg(unix)]
#[test]
fn private_directories_are_created_or_tightened_to_0700() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let fresh = dir.path().join("fresh/data");
    db::private_directory(&fresh).expect("creating");
    assert_eq!(mode(&fresh), 0o700);
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
    db::private_directory(&open).expect("tightening");
    assert_eq!(mode(&open), 0o700);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").expect("a file");
    let err = db::private_directory(&file).expect_err("a file is not a directory");
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
}
