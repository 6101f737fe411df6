//! The scheduler's tables: what each quota has reserved, each workload's admission, and the balancer's moves.

use sea_orm::{ConnectionTrait, Schema};
use sea_orm_migration::prelude::*;

/// Reserved amounts per quota scope (a project, or a user inside a project).
pub mod usage {
    use sea_orm::entity::prelude::*;

    /// A row of `quota_usage`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "quota_usage")]
    pub struct Model {
        /// `projects/{project}` or `projects/{project}/members/u-{username}`; with `#gpu-type={TYPE}` appended,
        /// what the scope's workloads using GPUs of that type reserve (only its GPUs are limited).
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        /// Reserved CPU, millicores.
        pub cpu_millis: i64,
        /// Reserved memory, bytes.
        pub memory_bytes: i64,
        /// Reserved GPUs, thousandths.
        pub gpu_millis: i64,
        /// Admitted notebooks.
        pub notebooks: i64,
        /// Admitted services.
        pub services: i64,
        /// Admitted runs.
        pub runs: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Workloads' admissions.
pub mod reservation {
    use sea_orm::entity::prelude::*;

    /// A row of `reservations`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "reservations")]
    pub struct Model {
        /// The workload's resource name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub workload: String,
        /// The project id.
        pub project: String,
        /// The user who asked.
        pub username: String,
        /// `train`, `notebook` or `service`.
        pub kind: String,
        /// Reserved CPU, millicores.
        pub cpu_millis: i64,
        /// Reserved memory, bytes.
        pub memory_bytes: i64,
        /// Reserved GPUs, thousandths.
        pub gpu_millis: i64,
        /// The GPU type the GPUs count against (`T4`); empty when the GPU string names none.
        pub gpu_type: String,
        /// `admitted` or `queued`.
        pub state: String,
        /// Why it is queued.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// The blockers, JSON.
        #[sea_orm(column_type = "Text")]
        pub blockers: String,
        /// Admitted or queued, Unix ms.
        pub created_ms: i64,
        /// The quota scopes (`quota_usage` rows) the admission reserves in, with the limits it was checked
        /// against, JSON: `[{"scope": "projects/p", "cpu_millis": 8000}, {"scope": "projects/p/members/u-lena"}]`
        /// (a limit not given is none). On MariaDB the insert trigger `reservations_reserve` reserves an admitted
        /// row's amounts from it; elsewhere it records what the admission was checked against.
        #[sea_orm(column_type = "Text")]
        pub scopes: String,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Nodes the balancer moved between resource groups.
pub mod node_move {
    use sea_orm::entity::prelude::*;

    /// A row of `node_moves`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "node_moves")]
    pub struct Model {
        /// The move's id (a UUID v7, so ids sort by time).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The cluster.
        pub cluster: String,
        /// The node.
        pub node: String,
        /// `cpu` or `gpu`.
        pub class: String,
        /// The group it left.
        pub from_group: String,
        /// The group it joined.
        pub to_group: String,
        /// Why, for people.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// The replica that made it.
        pub replica: String,
        /// When, Unix ms.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The scheduler's migrations.
#[derive(Debug)]
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateTables),
            Box::new(CreateMoves),
            Box::new(AddGpuType),
            Box::new(AddScopes),
            Box::new(ReserveTrigger),
        ]
    }
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261123_000001_create_admission_tables"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        let db = manager.get_connection();
        db.execute(&schema.create_table_from_entity(usage::Entity)).await?;
        db.execute(&schema.create_table_from_entity(reservation::Entity))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_reservations_project")
                    .table(Alias::new("reservations"))
                    .col(Alias::new("project"))
                    .to_owned(),
            )
            .await
    }
}

struct CreateMoves;

impl MigrationName for CreateMoves {
    fn name(&self) -> &str {
        "m20261123_000002_create_node_moves"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateMoves {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .get_connection()
            .execute(&schema.create_table_from_entity(node_move::Entity))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_node_moves_cluster")
                    .table(Alias::new("node_moves"))
                    .col(Alias::new("cluster"))
                    .col(Alias::new("created_ms"))
                    .to_owned(),
            )
            .await
    }
}

struct AddGpuType;

impl MigrationName for AddGpuType {
    fn name(&self) -> &str {
        "m20261124_000003_reservation_gpu_type"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddGpuType {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The first migration creates `reservations` from the entity as it is now, so on a new database the
        // column is already there; reservations made before GPU types counted hold none.
        if manager.has_column("reservations", "gpu_type").await? {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("reservations"))
                    .add_column(
                        ColumnDef::new(Alias::new("gpu_type"))
                            .string_len(63)
                            .not_null()
                            .default(""),
                    )
                    .to_owned(),
            )
            .await
    }
}

struct AddScopes;

impl MigrationName for AddScopes {
    fn name(&self) -> &str {
        "m20261201_000004_reservation_scopes"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddScopes {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // As for `gpu_type`: a new database has the column from the first migration. Reservations made before
        // hold no scopes, which MariaDB's trigger reads as nothing to reserve (they were reserved when made).
        if manager.has_column("reservations", "scopes").await? {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("reservations"))
                    .add_column(ColumnDef::new(Alias::new("scopes")).text().not_null().default("[]"))
                    .to_owned(),
            )
            .await
    }
}

/// The MariaDB trigger that makes storing an admitted reservation and reserving its amounts one statement: after
/// a row is inserted as `admitted`, it adds the row's amounts to each `quota_usage` row its `scopes` name, only
/// where that stays within the scope's limits, and when any scope would be exceeded it fails the statement with
/// [`QUOTA_EXCEEDED`], so the insert is undone with everything the trigger changed. Each row counts one notebook,
/// service or run, so every scope that fits changes and the number changed says whether all fit.
const RESERVE_TRIGGER: &str = r"
CREATE TRIGGER reservations_reserve AFTER INSERT ON reservations FOR EACH ROW
BEGIN
  DECLARE wanted INT DEFAULT COALESCE(JSON_LENGTH(NEW.scopes), 0);
  IF NEW.state = 'admitted' AND wanted > 0 THEN
    UPDATE quota_usage AS used
    JOIN JSON_TABLE(NEW.scopes, '$[*]' COLUMNS (
      scope VARCHAR(1024) PATH '$.scope',
      cpu_millis BIGINT PATH '$.cpu_millis',
      memory_bytes BIGINT PATH '$.memory_bytes',
      gpu_millis BIGINT PATH '$.gpu_millis',
      notebooks BIGINT PATH '$.notebooks',
      services BIGINT PATH '$.services',
      runs BIGINT PATH '$.runs'
    )) AS limits ON used.scope = limits.scope
    SET used.cpu_millis = used.cpu_millis + NEW.cpu_millis,
        used.memory_bytes = used.memory_bytes + NEW.memory_bytes,
        used.gpu_millis = used.gpu_millis + NEW.gpu_millis,
        used.notebooks = used.notebooks + (NEW.kind = 'notebook'),
        used.services = used.services + (NEW.kind = 'service'),
        used.runs = used.runs + (NEW.kind = 'train')
    WHERE (limits.cpu_millis IS NULL OR NEW.cpu_millis <= 0 OR used.cpu_millis + NEW.cpu_millis <= limits.cpu_millis)
      AND (limits.memory_bytes IS NULL OR NEW.memory_bytes <= 0
           OR used.memory_bytes + NEW.memory_bytes <= limits.memory_bytes)
      AND (limits.gpu_millis IS NULL OR NEW.gpu_millis <= 0 OR used.gpu_millis + NEW.gpu_millis <= limits.gpu_millis)
      AND (limits.notebooks IS NULL OR NEW.kind <> 'notebook' OR used.notebooks + 1 <= limits.notebooks)
      AND (limits.services IS NULL OR NEW.kind <> 'service' OR used.services + 1 <= limits.services)
      AND (limits.runs IS NULL OR NEW.kind <> 'train' OR used.runs + 1 <= limits.runs);
    IF ROW_COUNT() <> wanted THEN
      SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'cube: a quota would be exceeded';
    END IF;
  END IF;
END";

/// The message MariaDB's reserve trigger fails an insert with when a quota would be exceeded.
pub(crate) const QUOTA_EXCEEDED: &str = "cube: a quota would be exceeded";

struct ReserveTrigger;

impl MigrationName for ReserveTrigger {
    fn name(&self) -> &str {
        "m20261201_000005_reservations_reserve_trigger"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for ReserveTrigger {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // PostgreSQL admits in one statement of data-modifying CTEs and SQLite in a transaction (it is the
        // embedded single-process backend, whose writers take turns anyway); only MariaDB needs the trigger.
        if manager.get_database_backend() != sea_orm::DatabaseBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared("DROP TRIGGER IF EXISTS reservations_reserve")
            .await?;
        db.execute_unprepared(RESERVE_TRIGGER).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait as _, EntityTrait as _, IntoActiveModel as _};
    use sea_orm_migration::MigratorTrait as _;

    use super::*;

    /// A private in-memory database on one connection that stays open, as `cube up` opens it.
    async fn memory() -> sea_orm::DatabaseConnection {
        cube_kit::db::connect::<Migrator>("sqlite::memory:", false)
            .await
            .unwrap_or_else(|error| panic!("an in-memory database: {error}"))
    }

    #[tokio::test]
    async fn the_gpu_type_column_is_added_to_reservations_made_before_it() -> Result<(), DbErr> {
        let db = memory().await;
        Migrator::up(&db, Some(2)).await?;
        // The first migration creates the table as the entity is now; take the column away as it was then.
        db.execute_unprepared("ALTER TABLE reservations DROP COLUMN gpu_type")
            .await?;
        Migrator::up(&db, None).await?;
        let row = reservation::Model {
            workload: "projects/p/runs/r".into(),
            project: "p".into(),
            username: "lena".into(),
            kind: "train".into(),
            cpu_millis: 1000,
            memory_bytes: 0,
            gpu_millis: 1000,
            gpu_type: "T4".into(),
            state: "admitted".into(),
            reason: String::new(),
            blockers: "[]".into(),
            created_ms: 0,
            scopes: "[]".into(),
        };
        reservation::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(&db)
            .await?;
        let read = reservation::Entity::find_by_id(row.workload.clone()).one(&db).await?;
        assert_eq!(read, Some(row));
        // On a new database the column is there from the start, and the migration changes nothing.
        let fresh = memory().await;
        Migrator::up(&fresh, None).await?;
        assert!(
            SchemaManager::new(&fresh)
                .has_column("reservations", "gpu_type")
                .await?
        );
        Ok(())
    }
}
